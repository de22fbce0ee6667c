#!/usr/bin/env bash
# Runs StreamRT's tests: the core on tiny random-weight models, and the nodes on the real ComfyUI
# server (started as a subprocess on 127.0.0.1). Sets everything up first (scripts/setup.sh), and
# lints the repository with ruff ([tool.ruff] in pyproject.toml) before pytest: a finding fails the run.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k stream -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
