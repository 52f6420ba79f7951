#!/usr/bin/env bash
# The main command: set up .venv (pinned CPU stack) if needed, then run the nightly pipeline end to end
# on the bundled sample (ingest -> enrich -> train -> publish) on Prefect's local ephemeral API.
# Extra arguments go to `bridgerec run` (e.g. --config my.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- --config configs/sample.yaml; fi
if ! command -v bridgerec >/dev/null 2>&1; then
  echo "bridgerec is installed in .venv/bin: \`source .venv/bin/activate\` for the commands it names" >&2
fi
exec .venv/bin/bridgerec run "$@"
