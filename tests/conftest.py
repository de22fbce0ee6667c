"""Shared fixtures: a real ComfyUI server with the StreamRT pack mounted.

* ``comfy_server`` (session): one server per cache mode, parametrized over
  ``default`` / ``cache-none`` / ``cache-lru`` (flags ``()``, ``--cache-none``,
  ``--cache-lru 10``).  Restrict with ``STREAMRT_CACHE_MODES=default`` (comma list)
  for a quick local run.  pytest groups the tests by mode and stops one server
  before starting the next.
* ``streamrt_models_root`` (session): one models folder shared by all servers
  (each server's ``<work>/models`` is a symlink to it), with the sub folders
  ``checkpoints``, ``diffusers``, ``vae_approx``, ``loras``, ``engines``.
* ``e2e_tiny_models`` (session): hook point for e2e tests that need (tiny, random) model
  files: populate ``streamrt_models_root`` there; it returns that folder.
  ``models_dir(server)`` gives a server's ``<work>/models`` (same files).  (Not named
  ``tiny_models``: that fixture returns in-process ``streamrt.StreamModels``, below.)

Tiny random models in this process (CPU, float32; written once per session, loaded by
``streamrt.load_diffusers_folder``), for the core tests:

* ``tiny_folders`` (session): the diffusers folders ``tiny`` (with its TAESD folder ``taesd``) and
  ``tiny_v`` (v-prediction);
* ``tiny_models`` / ``tiny_taesd_models`` / ``tiny_v_models`` (session): the ``tiny`` pipeline with its
  full VAE / with TAESD, and the ``tiny-v`` pipeline;
* ``fresh_tiny_models`` (per test): a private copy of ``tiny`` for tests that change shared model state.

Helpers (plain functions and constants) are in modules beside this file, imported as top-level
modules: ``stream_helpers``, ``e2e_helpers``, ``model_files``, ``engine_helpers``, ``workflows``.

On a failing test that used ``comfy_server`` the tail of the server log is added to
the report.  The pack is mounted as ``nodes/StreamRT`` (module name / web path
``/extensions/StreamRT/``).

Environment: ``STREAMRT_COMFYUI`` (ComfyUI tree), ``STREAMRT_PYTHON`` (server
interpreter), ``STREAMRT_SERVER_START_TIMEOUT`` (seconds, default 180),
``STREAMRT_CACHE_MODES``, ``STREAMRT_SERVER_GPU=1`` (the server computes on the GPU instead of ``--cpu``),
``STREAMRT_SERVER_ARGS`` (more server flags).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:  # pytest.ini's pythonpath does this too; keep it for other rootdirs
    sys.path.insert(0, str(TESTS_DIR))

from comfy_harness import MODEL_FOLDERS, ComfyServer  # noqa: E402

PACK_NAME = "StreamRT"

#: cache mode name -> extra server flags
CACHE_MODES: dict[str, tuple[str, ...]] = {
    "default": (),
    "cache-none": ("--cache-none",),
    "cache-lru": ("--cache-lru", "10"),
}


def selected_cache_modes() -> list[str]:
    raw = os.environ.get("STREAMRT_CACHE_MODES", "").strip()
    if not raw:
        return list(CACHE_MODES)
    modes = [m.strip() for m in raw.split(",") if m.strip()]
    unknown = [m for m in modes if m not in CACHE_MODES]
    if unknown:
        raise pytest.UsageError(f"STREAMRT_CACHE_MODES: unknown mode(s) {unknown}; known: {list(CACHE_MODES)}")
    return modes


class _RepoRootIsNotATestPackage:
    """Collect the repo root as a plain directory, never as a package.

    The repo root is the ComfyUI pack and holds an ``__init__.py`` meant to be imported by
    ComfyUI only.  Since pytest 8 the collection tree starts at the rootdir (the folder of
    pytest.ini), and a ``Package`` node imports its ``__init__.py`` in ``setup()`` before
    the first test under it runs.  This global plugin (registered from ``pytest_configure``
    below, so it also covers the root, above this conftest's own folder) answers
    ``pytest_collect_directory`` for the repo root with a plain ``pytest.Dir``.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector):
        if Path(path).resolve() == REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=Path(path))
        return None


def pytest_configure(config: pytest.Config) -> None:
    # also declared in pytest.ini; repeated so the marker exists under any rootdir
    config.addinivalue_line("markers", "e2e: end-to-end test that starts a real ComfyUI server subprocess")
    config.addinivalue_line("markers", "network: needs a package index (pip resolves packages from it)")
    if not config.pluginmanager.has_plugin("streamrt-repo-root-guard"):
        config.pluginmanager.register(_RepoRootIsNotATestPackage(), "streamrt-repo-root-guard")


@pytest.fixture(scope="session", autouse=True)
def _torch_on_one_cpu_thread():
    """Run the test process's torch on one CPU thread.

    The tiny models' ops gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
    spinning against the ComfyUI server and other processes make a 40 ms step take seconds.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def models_dir(server: ComfyServer) -> Path:
    """``<work>/models`` of a server (checkpoints/, diffusers/, vae_approx/, loras/, engines/)."""
    return server.models_dir


@pytest.fixture(scope="session")
def streamrt_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for sub in MODEL_FOLDERS.values():
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def e2e_tiny_models(streamrt_models_root: Path) -> Path:
    """The tiny ``tiny-sd`` model and ``tiny-taesd`` written into ``streamrt_models_root``.

    Servers see the files at once (``<work>/models`` links to that folder, and ComfyUI
    re-lists model folders when their mtime changes). A module that needs more models overrides
    this fixture and asks for it by the same name to get these too.
    """
    from stream_helpers import write_e2e_models

    return write_e2e_models(streamrt_models_root)


@pytest.fixture(scope="session")
def core_models(e2e_tiny_models: Path):
    """The e2e servers' tiny pipeline (``tiny-sd`` + ``tiny-taesd``) loaded in this process by the core's own loader,
    to compare the server's frames with."""
    from stream_helpers import E2E_MODEL, E2E_TAESD

    from streamrt import load_diffusers_folder

    return load_diffusers_folder(e2e_tiny_models / "diffusers" / E2E_MODEL, dtype="fp32", device="cpu",
                                 taesd=e2e_tiny_models / "vae_approx" / E2E_TAESD)


# stream_helpers imports torch and streamrt: imported inside the fixtures, so this conftest loads without them
@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Diffusers folders of the ``tiny`` (with a TAESD folder) and ``tiny-v`` random pipelines."""
    from stream_helpers import write_tiny_folders

    return write_tiny_folders(tmp_path_factory.mktemp("stream_models"))


@pytest.fixture(scope="session")
def tiny_models(tiny_folders: dict[str, Path]):
    """Epsilon-prediction tiny pipeline with its full ``AutoencoderKL`` (``streamrt.StreamModels``)."""
    from stream_helpers import quiet_load

    return quiet_load(tiny_folders["tiny"])


@pytest.fixture(scope="session")
def tiny_taesd_models(tiny_folders: dict[str, Path]):
    """The same pipeline with the TAESD (``AutoencoderTiny``) VAE."""
    from stream_helpers import quiet_load

    return quiet_load(tiny_folders["tiny"], taesd=tiny_folders["taesd"])


@pytest.fixture(scope="session")
def tiny_v_models(tiny_folders: dict[str, Path]):
    """v-prediction tiny pipeline (SD2-shaped) with its full VAE."""
    from stream_helpers import quiet_load

    return quiet_load(tiny_folders["tiny_v"])


@pytest.fixture
def fresh_tiny_models(tiny_folders: dict[str, Path]):
    """A private copy of the tiny pipeline (own prompt cache), for tests that change shared model state."""
    from stream_helpers import quiet_load

    return quiet_load(tiny_folders["tiny"])


@pytest.fixture(scope="session", params=selected_cache_modes())
def comfy_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 streamrt_models_root: Path):
    mode = request.param
    work = tmp_path_factory.mktemp(f"comfy-{mode}")
    # STREAMRT_SERVER_GPU=1: the server computes on ComfyUI's GPU (the GPU machine's e2e runs);
    # STREAMRT_SERVER_ARGS: more server flags (e.g. --front-end-root where no frontend package is installed).
    extra = CACHE_MODES[mode] + tuple(shlex.split(os.environ.get("STREAMRT_SERVER_ARGS", "")))
    cpu = os.environ.get("STREAMRT_SERVER_GPU") != "1"
    # A CPU server computes the tiny models on one torch thread, like this process (_torch_on_one_cpu_thread):
    # beside Chromium on a busy 2-core machine, two spinning OpenMP threads made a 15 ms step take 400 ms.
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if cpu else {}
    server = ComfyServer(REPO_ROOT, work, extra_args=extra, pack_name=PACK_NAME, models_source=streamrt_models_root,
                         cpu=cpu, env=env)
    server.cache_mode = mode  # for tests that depend on caching
    server.start(timeout=float(os.environ.get("STREAMRT_SERVER_START_TIMEOUT", "180")))
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        server = getattr(item, "funcargs", {}).get("comfy_server")
        if isinstance(server, ComfyServer):
            report.sections.append((f"ComfyUI server log ({server.log_path}), last lines", server.log_tail(60)))
