#!/usr/bin/env bash
# Set up (first run only) and run the kw command: ./kw.sh models, ./kw.sh demo, ...
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/kw "$@"
