#!/usr/bin/env bash
# Set up (first run only) and run the default test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 "$@"
