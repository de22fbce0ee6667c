"""requirements.txt never changes the torch a ComfyUI environment already has.

ComfyUI-Manager (and the README's manual install) runs ``pip install -r requirements.txt`` inside the user's
ComfyUI Python, whose torch was chosen for its GPU. The file lists no torch, but ``accelerate`` declares one: this
checks what pip would really do. A fresh virtual environment sees exactly the torch and torchvision of this test
environment and what they need (linked in through a ``.pth`` file) and nothing else; pip (this environment's,
through ``--python``) resolves requirements.txt there with ``--dry-run --report``, and its report must install
none of torch, torchvision, their CUDA libraries or anything else they bring (a ``torch`` requirement is satisfied
by the torch that is there, whatever its version). A second dry run first shows the check can fire: with the
torchvision link left out, asking for torchvision is reported as an install.

Needs a package index (pip resolves diffusers, transformers, ... from it): marked ``network``; CI installs everything
with pip, so it has one. About half a minute.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.network

REPO = Path(__file__).resolve().parent.parent
TORCH_FAMILY = ("torch", "torchvision")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """The installed distributions ``names`` need, with what they need (extras followed), by canonical name."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(name, frozenset()) for name in names]
    seen = set()
    while todo:
        name, extras = todo.pop()
        if (canonical(name), extras) in seen:
            continue
        seen.add((canonical(name), extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[canonical(name)] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if any(req.marker is None or req.marker.evaluate({"extra": extra}) for extra in ("", *extras)):
                todo.append((req.name, frozenset(req.extras)))
    return found


def environment_with(tmp_path: Path, dists: dict[str, metadata.Distribution]) -> Path:
    """A fresh venv (no pip, no setuptools of its own) that sees exactly ``dists``; its python."""
    linked = tmp_path / "linked"
    linked.mkdir(parents=True)
    for dist in dists.values():
        for top in {Path(str(f)).parts[0] for f in dist.files or ()}:
            source = Path(dist.locate_file(top))
            if top not in ("..", "bin") and source.exists() and not (linked / top).exists():
                (linked / top).symlink_to(source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "linked.pth").write_text(f"{linked}\n", encoding="utf-8")
    return python


def would_install(python: Path, *args: str, report: Path) -> dict[str, str]:
    """``{canonical name: version}`` that ``pip install args`` would install or change in ``python``'s environment."""
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
                           "--disable-pip-version-check", "--report", str(report), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"pip could not resolve {args}:\n{done.stderr[-3000:]}"
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"]
            for item in json.loads(report.read_text(encoding="utf-8"))["install"]}


def test_requirements_never_change_the_installed_torch(tmp_path: Path) -> None:
    torch_env = closure(TORCH_FAMILY)
    assert {"torch", "torchvision"} <= set(torch_env), "this test needs torch and torchvision installed"
    requirements = (REPO / "requirements.txt").read_text(encoding="utf-8")
    listed = {canonical(Requirement(line).name) for line in requirements.splitlines()
              if line.strip() and not line.startswith("#")}
    assert not listed & set(TORCH_FAMILY), "requirements.txt lists torch itself"

    # the probe fires: a torch-family package missing from the environment is reported as an install
    without_torchvision = {k: v for k, v in torch_env.items() if k != "torchvision"}
    probe = would_install(environment_with(tmp_path / "probe", without_torchvision), "torchvision",
                          report=tmp_path / "probe.json")
    assert "torchvision" in probe and "torch" not in probe, probe

    python = environment_with(tmp_path / "env", torch_env)
    planned = would_install(python, "-r", str(REPO / "requirements.txt"), report=tmp_path / "report.json")
    assert {"diffusers", "transformers", "accelerate", "polygraphy", "onnx"} <= set(planned), planned  # it resolved
    touched = {name: version for name, version in planned.items()
               if name in torch_env or name.startswith(("torch", "nvidia-", "cuda-", "triton"))}
    assert not touched, f"pip would install or change torch's packages: {touched}"
