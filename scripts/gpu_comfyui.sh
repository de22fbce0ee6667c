#!/usr/bin/env bash
# The real ComfyUI server on the GPU machine, which has torch but neither ComfyUI nor the few packages
# ComfyUI needs to start. At most 64 MiB travel per call, so the tree is slimmed to what an API-driven
# server runs (no frontend package, no API nodes, no tokenizers of other model families).
#   here:   bash scripts/gpu_comfyui.sh prepare            -> .gpu/ComfyUI and .gpu/wheels (git-ignored)
#   there:  bash scripts/gpu_comfyui.sh soak [soak args]   (carry .gpu and .whl; see scripts/soak.py)
#           bash scripts/gpu_comfyui.sh pytest [pytest args] (e2e tests with the server on the GPU)
#           bash scripts/gpu_comfyui.sh overhead [args]      (scripts/node_overhead.py with the server on the GPU)
#           bash scripts/gpu_comfyui.sh routes [args]        (scripts/webcam_routes.py with the server on the GPU)
#           bash scripts/gpu_comfyui.sh restart [args]       (scripts/compile_restart.py, no server)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  [ -f .comfyui/ComfyUI/main.py ] || bash scripts/setup.sh
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf .gpu && mkdir -p .gpu/wheels
  cp -r .comfyui/ComfyUI .gpu/ComfyUI
  (cd .gpu/ComfyUI && rm -rf tests tests-unit comfy_api_nodes .git \
     comfy/text_encoders/*_tokenizer comfy/text_encoders/t5_pile_tokenizer && find . -name __pycache__ -prune -exec rm -rf {} +)
  # ComfyUI's start needs av (comfy_api) and torchsde (samplers); pydantic-settings (comfy_config), the
  # database (alembic, SQLAlchemy), kornia and spandrel are optional or only used by extra nodes; websocket-client
  # drives the server in the e2e tests and scripts/node_overhead.py. accelerate (+ psutil) is in our requirements:
  # without it diffusers initialises every weight randomly before loading, so load times would not be a user's.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .gpu/wheels av==18.1.0 torchsde==0.2.6 trampoline==0.1.2 websocket-client==1.9.2 \
    accelerate==1.15.0 psutil==7.2.2
  [ -f .whl/diffusers-0.42.1-py3-none-any.whl ] || bash ../shared/device/wheels.sh
  du -sh .gpu .gpu/ComfyUI .gpu/wheels
  ;;
soak|pytest|overhead|routes|restart)
  what=$1
  shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl .whl/diffusers-*.whl
  export PYTHONPATH="$PWD:/tmp/site" STREAMRT_COMFYUI="$PWD/.gpu/ComfyUI" STREAMRT_PYTHON=python3 PYTHONUNBUFFERED=1
  mkdir -p /tmp/streamrt-frontend
  if [ "$what" = soak ]; then
    python3 scripts/soak.py --front-end-root /tmp/streamrt-frontend "$@"
  elif [ "$what" = overhead ]; then
    python3 scripts/node_overhead.py --server-arg=--front-end-root --server-arg=/tmp/streamrt-frontend "$@"
  elif [ "$what" = restart ]; then
    python3 scripts/compile_restart.py "$@"
  elif [ "$what" = routes ]; then
    python3 scripts/webcam_routes.py --server-arg=--front-end-root --server-arg=/tmp/streamrt-frontend "$@"
  else
    STREAMRT_SERVER_GPU=1 STREAMRT_SERVER_ARGS="--front-end-root /tmp/streamrt-frontend ${STREAMRT_SERVER_ARGS:-}" \
      STREAMRT_CACHE_MODES=default python3 -m pytest -q -p no:cacheprovider "$@"
  fi
  ;;
*)
  echo "usage: $0 prepare | soak [scripts/soak.py arguments] | pytest [pytest arguments] | overhead [scripts/node_overhead.py arguments] | routes [scripts/webcam_routes.py arguments] | restart [scripts/compile_restart.py arguments]" >&2
  exit 2
  ;;
esac
