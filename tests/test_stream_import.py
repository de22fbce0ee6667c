"""The core package imports without ComfyUI: no ``comfy*``, ``nodes``, ``server`` or ``folder_paths`` module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = (
    "import sys\n"
    "{imports}\n"
    "bad = sorted(m for m in sys.modules if m.startswith('comfy')"
    " or m.split('.')[0] in ('nodes', 'server', 'folder_paths'))\n"
    "print('loaded:', repr(bad))\n"
)


@pytest.mark.parametrize("imports", [
    "import streamrt",
    # every module of the package, not only what __init__ pulls in
    "import importlib, pkgutil, streamrt\n"
    "for info in pkgutil.walk_packages(streamrt.__path__, 'streamrt.'):\n"
    "    importlib.import_module(info.name)",
], ids=["package", "every-module"])
def test_import_loads_no_comfyui_module(imports):
    done = subprocess.run([sys.executable, "-c", CHECK.format(imports=imports)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "loaded: []", done.stdout
