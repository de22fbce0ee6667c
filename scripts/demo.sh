#!/usr/bin/env bash
# The main job: a headless ComfyUI running StreamRT over a video. Sets everything up first.
# Options go to scripts/demo.py (e.g. --model /path/to/diffusers/sd-turbo --taesd /path/to/taesd).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
