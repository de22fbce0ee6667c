"""StreamRT: realtime streaming diffusion for ComfyUI.

ComfyUI imports this file as the node pack. The pack's code lives in ``nodes/`` (ComfyUI adapters)
and ``streamrt/`` (the ComfyUI-free core); outside ComfyUI this file exposes nothing.
"""

WEB_DIRECTORY = "./js"

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint  # noqa: F401
