#!/usr/bin/env bash
# The test command: set up .venv (pinned CPU stack) if needed, lint, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The night report's browser test loads the page in a real headless Chromium (Debian's package). Install it
# when it is missing and this runs as root with apt (CI); elsewhere the test skips without it.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the report's browser test (once)..." >&2
  if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core) \
      >/tmp/bridgerec-apt-chromium.log 2>&1; then
    echo "could not install chromium (see /tmp/bridgerec-apt-chromium.log)" >&2
  fi
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export BRIDGEREC_BROWSER_REQUIRED=1  # installed (or tried to): the browser test fails rather than skips
fi
# The run's own temporary folders live under one root, removed when the run ends (pass or fail).
scratch="$(mktemp -d -t bridgerec-tests-XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
export PREFECT_HOME="${PREFECT_HOME:-$scratch/prefect}"  # a private Prefect DB for the test run
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# The sample's item texts are embedded once per test run (tests/train_data.py: EMBEDDING_CACHE).
export BRIDGEREC_TEST_EMBEDDING_CACHE="${BRIDGEREC_TEST_EMBEDDING_CACHE:-$scratch/embeddings}"
mkdir -p "$PREFECT_HOME" "$BRIDGEREC_TEST_EMBEDDING_CACHE"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two pytest-xdist workers, a test file per worker at a time (files share their module fixtures): each
# test runs single-threaded (OMP_NUM_THREADS=1), so on CI's 2 cores two workers about halve the wall time.
# BRIDGEREC_TEST_WORKERS=0 runs in one process (pytest's own output, e.g. to debug one test).
workers="${BRIDGEREC_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  .venv/bin/python -m pytest "$@"
  exit
fi
.venv/bin/python -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
