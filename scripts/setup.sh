#!/usr/bin/env bash
# Create .venv (once) and install kernelwarehouse with its extras, torch pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[all,test]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
