"""Drive a REAL ComfyUI server (subprocess) from tests, over HTTP and websocket only.

Nothing here imports ComfyUI: the server runs in its own process, started from the
ComfyUI source tree given by ``$STREAMRT_COMFYUI`` (default ``<repo>/.comfyui/ComfyUI``)
with the interpreter ``$STREAMRT_PYTHON`` (default ``<repo>/.venv/bin/python``, else
``sys.executable``).

Typical use::

    from comfy_harness import ComfyServer, Graph

    with ComfyServer(pack_dir, work_dir) as srv:          # starts the server, waits for it
        g = Graph()
        img = g.node("EmptyImage", width=8, height=8, batch_size=1, color=0xFF0000)
        save = g.node("SaveImage", images=img.out(0), filename_prefix="t")
        outputs = srv.run(g)                               # {node_id: ui-output dict}
        arrays = srv.output_images(outputs, save.id)       # list of float32 HxWxC in [0, 1]

Work-dir layout made by :class:`ComfyServer`::

    <work>/extra_model_paths.yaml   custom_nodes + model folders (see below)
    <work>/nodes/<pack_name>        symlink to the pack under test (and any extra packs)
    <work>/models/{checkpoints,diffusers,vae_approx,loras,engines}
                                    (``models`` may be a symlink to a shared folder)
    <work>/input  <work>/out  <work>/tmp (ComfyUI's temp folder is tmp/temp)  <work>/user
    <work>/server.log               the server's stdout + stderr

The yaml registers ``custom_nodes``, ``checkpoints``, ``diffusers``, ``vae_approx``, ``vae``,
``loras``, ``controlnet`` and the custom key ``streamrt_engines`` (-> ``models/engines``).

Things worth knowing about the server (ComfyUI 0.3.75):

* ``POST /free`` only sets flags; the prompt worker thread acts on them after the
  current prompt (or at once when idle).  :meth:`ComfyServer.free` therefore runs a
  barrier of two tiny prompts (see :meth:`ComfyServer.barrier`) so that, on return,
  the unload really happened.  Those prompts replace the "current prompt" of the
  output cache: with the default (classic) cache, outputs of nodes that are not in
  the barrier graph are dropped.  Pass ``wait=False`` to avoid this.
* ``print`` from nodes is block-buffered by ComfyUI's log interceptor and may show up
  in ``server.log`` late; ``logging`` lines are flushed at once.
* A failed prompt is *not* an HTTP error: ``/prompt`` answers 200, the history entry
  has ``status.status_str == "error"`` and an ``execution_error`` (or
  ``execution_interrupted``) message.  :meth:`ComfyServer.run` turns that into
  :class:`ExecutionFailed` / :class:`ExecutionInterrupted`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:  # numpy is imported where it is used (the harness does not need it to drive a server)
    import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent

#: model folder keys registered in the extra-model-paths yaml, -> sub folder of <work>/models
MODEL_FOLDERS: dict[str, str] = {
    "checkpoints": "checkpoints",
    "diffusers": "diffusers",
    "vae_approx": "vae_approx",
    "vae": "vae",
    "loras": "loras",
    "controlnet": "controlnet",
    "streamrt_engines": "engines",
}


def comfyui_dir() -> Path:
    """The ComfyUI source tree (``$STREAMRT_COMFYUI`` or ``<repo>/.comfyui/ComfyUI``)."""
    return Path(os.environ.get("STREAMRT_COMFYUI") or REPO_ROOT / ".comfyui" / "ComfyUI").resolve()


def server_python() -> str:
    """Interpreter that runs the server (``$STREAMRT_PYTHON``, the repo venv, or this one)."""
    env = os.environ.get("STREAMRT_PYTHON")
    if env:
        return env
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- errors


class ComfyError(RuntimeError):
    """Base class of the errors raised by this harness."""


class ServerStartError(ComfyError):
    pass


class PromptRejected(ComfyError):
    """``POST /prompt`` answered 400 (validation failed). ``.answer`` is the server's JSON."""

    def __init__(self, answer: Any, status: int = 400):
        self.answer = answer
        self.status = status
        self.error = answer.get("error") if isinstance(answer, dict) else None
        self.node_errors = answer.get("node_errors", {}) if isinstance(answer, dict) else {}
        super().__init__(f"prompt rejected (HTTP {status}):\n{json.dumps(answer, indent=2, default=str)}")

    def error_types(self) -> list[str]:
        """All ``type`` strings: the top ``error.type`` and each node error's ``type``."""
        out = []
        if isinstance(self.error, dict) and "type" in self.error:
            out.append(self.error["type"])
        for ne in self.node_errors.values():
            out.extend(e.get("type") for e in ne.get("errors", []))
        return out


class ExecutionFailed(ComfyError):
    """A queued prompt ended with ``status_str == "error"`` (the ``execution_error`` message)."""

    def __init__(self, message: str, node_id: str | None = None, node_type: str | None = None,
                 exception_type: str | None = None, traceback: Sequence[str] | None = None,
                 history: dict | None = None):
        self.message = message
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.traceback = list(traceback or [])
        self.history = history
        super().__init__(f"node {node_id} ({node_type}) raised {exception_type}: {message}")


class ExecutionInterrupted(ExecutionFailed):
    """The prompt ended with an ``execution_interrupted`` message (``POST /interrupt``)."""


# --------------------------------------------------------------------------- graph helper


class NodeRef:
    """A node of a :class:`Graph`; ``out(i)`` is the API-format link ``[id, i]``."""

    def __init__(self, graph: Graph, node_id: str):
        self.graph = graph
        self.id = node_id

    def out(self, index: int = 0) -> list:
        return [self.id, index]

    def set(self, **inputs: Any) -> NodeRef:
        self.graph.nodes[self.id]["inputs"].update(_inputs(inputs))
        return self

    @property
    def inputs(self) -> dict:
        return self.graph.nodes[self.id]["inputs"]


def _inputs(inputs: Mapping[str, Any]) -> dict:
    return {k: (v.out(0) if isinstance(v, NodeRef) else v) for k, v in inputs.items()}


class Graph:
    """Tiny builder for API-format prompts (``{id: {"class_type", "inputs"}}``).

    ``g.node(class_type, id=None, **inputs)``; a :class:`NodeRef` given as an input value
    means its output 0.  ``g.to_dict()`` (or passing ``g`` to the server) gives the dict.
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.nodes: dict[str, dict] = {}
        self._n = 0

    def node(self, class_type: str, id: str | None = None, **inputs: Any) -> NodeRef:
        if id is None:
            self._n += 1
            id = f"{self.prefix}{self._n}"
            while id in self.nodes:
                self._n += 1
                id = f"{self.prefix}{self._n}"
        id = str(id)
        self.nodes[id] = {"class_type": class_type, "inputs": _inputs(inputs)}
        return NodeRef(self, id)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self.nodes))  # deep copy, and checks it is JSON

    def __getitem__(self, node_id: str) -> dict:
        return self.nodes[node_id]


def as_prompt(graph: Graph | Mapping) -> dict:
    return graph.to_dict() if isinstance(graph, Graph) else dict(graph)


# --------------------------------------------------------------------------- images


def image_bytes_to_array(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> float32 array HxWxC in [0, 1] (RGB, or RGBA when it has alpha)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode not in ("RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        return np.asarray(im, dtype=np.float32) / 255.0


#: ComfyUI's binary websocket events (protocol.BinaryEventTypes)
PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA = 1, 4


def decode_preview(message: bytes) -> tuple[dict | None, bytes] | None:
    """A binary websocket message -> ``(metadata, image bytes)`` for a preview (``metadata`` None for the old
    format, which carries no node id), or None for another binary event (e.g. progress text)."""
    import struct

    (event,) = struct.unpack(">I", message[:4])
    if event == PREVIEW_IMAGE:
        return None, message[8:]  # after the image type (1 JPEG, 2 PNG)
    if event == PREVIEW_IMAGE_WITH_METADATA:
        (length,) = struct.unpack(">I", message[4:8])
        return json.loads(message[8:8 + length].decode("utf-8")), message[8 + length:]
    return None


def load_image_array(path: str | os.PathLike) -> np.ndarray:
    return image_bytes_to_array(Path(path).read_bytes())


def array_to_png_bytes(array: Any) -> bytes:
    """float array in [0, 1] (HxW, HxWx3, HxWx4; or 1xHxWxC as ComfyUI IMAGE) or uint8 -> PNG."""
    import numpy as np
    from PIL import Image

    a = np.asarray(array)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"array_to_png_bytes takes one image; got a batch of {a.shape[0]}")
        a = a[0]
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- websocket


class WSCollector:
    """Collects websocket messages of one ``clientId`` in a background thread.

    ``events`` is a list of ``(type, data)`` for the JSON messages, ``binary`` the raw
    binary frames (previews), ``timeline`` both in the order they came (a binary frame as
    ``("<binary>", bytes)``).  Queue prompts with ``client_id=collector.client_id`` to
    get ``executing`` / ``executed`` / ``progress`` / custom ``send_sync`` events.

    ``feature_flags``: sent as the first message, as the frontend does (e.g.
    ``{"supports_preview_metadata": True}``: previews then come as binary events of type 4,
    with the node's id); the constructor returns once the server answered.
    """

    def __init__(self, host: str, port: int, client_id: str | None = None, connect_timeout: float = 10.0,
                 feature_flags: Mapping[str, Any] | None = None):
        import websocket  # websocket-client

        self.client_id = client_id or uuid.uuid4().hex
        self.events: list[tuple[str, Any]] = []
        self.binary: list[bytes] = []
        self.timeline: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        self._closed = False
        self.error: BaseException | None = None
        self._ws = websocket.WebSocket()
        self._ws.connect(f"ws://{host}:{port}/ws?clientId={self.client_id}", timeout=connect_timeout)
        self._ws.settimeout(0.5)
        if feature_flags is not None:
            self._ws.send(json.dumps({"type": "feature_flags", "data": dict(feature_flags)}))
        self._thread = threading.Thread(target=self._loop, name=f"ws-{self.client_id[:8]}", daemon=True)
        self._thread.start()
        if feature_flags is not None:
            self.wait_for("feature_flags", timeout=connect_timeout)

    def _loop(self) -> None:
        import websocket

        while not self._closed:
            try:
                opcode, data = self._ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception as e:  # connection closed or broken
                if not self._closed:
                    self.error = e
                break
            with self._cond:
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    try:
                        msg = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
                        self.events.append((msg.get("type"), msg.get("data")))
                    except ValueError:
                        self.events.append(("<non-json>", data))
                    self.timeline.append(self.events[-1])
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    self.binary.append(bytes(data))
                    self.timeline.append(("<binary>", self.binary[-1]))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def of_type(self, event_type: str, prompt_id: str | None = None) -> list[Any]:
        """Data of the events of one type (optionally only those of one prompt)."""
        with self._cond:
            return [d for t, d in self.events if t == event_type
                    and (prompt_id is None or (isinstance(d, dict) and d.get("prompt_id") == prompt_id))]

    def wait_for(self, predicate: str | Callable[[str, Any], bool], timeout: float = 30.0) -> tuple[str, Any]:
        """Wait until an event matches (a type name, or ``predicate(type, data)``); return it.

        Events already received count, so call it after the action that causes the event.
        """
        if isinstance(predicate, str):
            name = predicate
            predicate = lambda t, d: t == name  # noqa: E731
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for t, d in self.events[seen:]:
                    if predicate(t, d):
                        return t, d
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching websocket event in {timeout}s; got types "
                                       f"{[t for t, _ in self.events]}")
                if self._closed:
                    raise ComfyError(f"websocket closed: {self.error!r}")
                self._cond.wait(min(left, 0.5))

    def wait_prompt_done(self, prompt_id: str, timeout: float = 60.0) -> tuple[str, Any]:
        """Wait for ``executing`` with ``node: None`` for that prompt (the worker's end marker)."""
        return self.wait_for(lambda t, d: t == "executing" and isinstance(d, dict)
                             and d.get("node") is None and d.get("prompt_id") == prompt_id, timeout)

    def clear(self) -> None:
        with self._cond:
            self.events.clear()
            self.binary.clear()
            self.timeline.clear()

    def close(self) -> None:
        self._closed = True
        try:
            self._ws.close()
        except Exception:
            pass
        self._thread.join(timeout=5)

    def __enter__(self) -> WSCollector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- server


class ComfyServer:
    """A real ComfyUI server process with one pack (plus optional extra packs) mounted.

    :param pack_dir: folder of the custom node pack under test (linked as ``nodes/<pack_name>``).
    :param work_dir: folder for config, models, input/output/temp/user folders and the log.
    :param extra_args: more command-line flags, e.g. ``("--cache-none",)`` or ``("--cache-lru", "10")``.
    :param port: TCP port; a free one is picked when ``None``.
    :param pack_name: folder name the pack is mounted under (it is the python module name
        ComfyUI gives the pack and the ``/extensions/<pack_name>/`` web path); default:
        the pack folder's name.
    :param extra_packs: ``{name: path}`` of more custom node folders to mount beside it.
    :param models_source: when given, ``<work>/models`` is made a symlink to this folder, so
        several servers (e.g. one per cache mode) share one set of (tiny) models.
    :param cpu: pass ``--cpu`` (default True).
    :param env: extra environment variables for the server process.
    :param database_url: ``--database-url``; the default in-memory sqlite makes the server log
        harmless "SQLite objects created in a thread can only be used in that same thread"
        tracebacks (pass ``f"sqlite:///{work}/comfy.db"`` for a quiet log).
    :param model_folders: the model folder keys the yaml registers, ``{key: sub folder of <work>/models}``
        (default :data:`MODEL_FOLDERS`); leave a key out to see what the server does without it.
    """

    def __init__(self, pack_dir: str | os.PathLike | None, work_dir: str | os.PathLike, *,
                 extra_args: Iterable[str] = (), port: int | None = None, pack_name: str | None = None,
                 extra_packs: Mapping[str, str | os.PathLike] | None = None,
                 models_source: str | os.PathLike | None = None, cpu: bool = True,
                 env: Mapping[str, str] | None = None, host: str = "127.0.0.1",
                 database_url: str = "sqlite:///:memory:", model_folders: Mapping[str, str] | None = None):
        self.pack_dir = Path(pack_dir).resolve() if pack_dir is not None else None
        self.work_dir = Path(work_dir).resolve()
        self.extra_args = tuple(str(a) for a in extra_args)
        self.port = port
        self.host = host
        self.pack_name = pack_name or (self.pack_dir.name if self.pack_dir is not None else None)
        self.extra_packs = {k: Path(v).resolve() for k, v in (extra_packs or {}).items()}
        self.models_source = Path(models_source).resolve() if models_source is not None else None
        self.cpu = cpu
        self.env = dict(env or {})
        self.database_url = database_url
        self.model_folders = dict(MODEL_FOLDERS if model_folders is None else model_folders)
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self.session = requests.Session()
        self.client_id = uuid.uuid4().hex  # default client id for queued prompts

    # ---- paths
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "server.log"

    @property
    def yaml_path(self) -> Path:
        return self.work_dir / "extra_model_paths.yaml"

    @property
    def models_dir(self) -> Path:
        return self.work_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.work_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.work_dir / "out"

    @property
    def temp_dir(self) -> Path:
        """Where ComfyUI writes "temp" files (PreviewImage): ``<work>/tmp/temp``.

        (``--temp-directory X`` makes ComfyUI use ``X/temp``; it also empties that folder
        at start.)
        """
        return self.work_dir / "tmp" / "temp"

    @property
    def user_dir(self) -> Path:
        return self.work_dir / "user"

    @property
    def nodes_dir(self) -> Path:
        return self.work_dir / "nodes"

    # ---- lifecycle
    def prepare(self) -> None:
        """Create the work-dir layout, pack links and yaml (``start`` calls it)."""
        for d in (self.work_dir, self.input_dir, self.output_dir, self.work_dir / "tmp", self.user_dir, self.nodes_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.models_source is not None:
            self.models_source.mkdir(parents=True, exist_ok=True)
            if self.models_dir.is_symlink() or self.models_dir.exists():
                if not (self.models_dir.is_symlink() and self.models_dir.resolve() == self.models_source):
                    if self.models_dir.is_symlink():
                        self.models_dir.unlink()
                    else:
                        raise ServerStartError(f"{self.models_dir} exists and is not a link to {self.models_source}")
            if not self.models_dir.exists():
                self.models_dir.symlink_to(self.models_source, target_is_directory=True)
        for sub in self.model_folders.values():
            (self.models_dir / sub).mkdir(parents=True, exist_ok=True)
        packs = dict(self.extra_packs)
        if self.pack_dir is not None:
            packs[self.pack_name] = self.pack_dir
        for name, path in packs.items():
            if "." in name or "/" in name:
                raise ValueError(f"pack name {name!r}: no dots or slashes (it becomes a module name)")
            link = self.nodes_dir / name
            if link.is_symlink() or link.exists():
                if link.is_symlink() and link.resolve() == path:
                    continue
                if link.is_symlink():
                    link.unlink()
                else:
                    raise ServerStartError(f"{link} exists and is not a symlink")
            link.symlink_to(path, target_is_directory=True)
        lines = ["streamrt_test:", f"    base_path: {json.dumps(str(self.work_dir))}",
                 "    custom_nodes: nodes"]
        lines += [f"    {key}: models/{sub}" for key, sub in self.model_folders.items()]
        self.yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def command(self) -> list[str]:
        main_py = comfyui_dir() / "main.py"
        cmd = [server_python(), str(main_py)]
        if self.cpu:
            cmd.append("--cpu")
        cmd += ["--listen", self.host, "--port", str(self.port),
                "--extra-model-paths-config", str(self.yaml_path),
                "--output-directory", str(self.output_dir),
                "--temp-directory", str(self.work_dir / "tmp"),
                "--input-directory", str(self.input_dir),
                "--user-directory", str(self.user_dir),
                "--database-url", self.database_url,
                "--disable-auto-launch"]
        cmd += list(self.extra_args)
        return cmd

    def start(self, timeout: float = 120.0) -> ComfyServer:
        """Launch the server and wait until ``GET /system_stats`` answers.

        With an auto-picked port, a start that dies because the port got taken meanwhile
        is retried (twice) on a new port.
        """
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not (comfyui_dir() / "main.py").exists():
            raise ServerStartError(f"no ComfyUI at {comfyui_dir()} (set STREAMRT_COMFYUI)")
        self.prepare()
        auto_port = self.port is None
        for attempt in range(3 if auto_port else 1):
            if auto_port:
                self.port = free_port(self.host)
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                return self._start_once(timeout)
            except ServerStartError:
                log = self.log_text()[log_offset:]
                if auto_port and "address already in use" in log.lower() and attempt < 2:
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> ComfyServer:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(f"\n===== harness: starting {' '.join(self.command())}\n".encode())
        self.proc = subprocess.Popen(self.command(), cwd=str(self.work_dir), env=env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._close_log()
                self.proc = None
                raise ServerStartError(f"ComfyUI exited with {code} during start; log tail:\n{self.log_tail()}")
            try:
                r = self.session.get(self.base_url + "/system_stats", timeout=2)
                if r.status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"ComfyUI did not answer in {timeout}s; log tail:\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``); return its exit code."""
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
            code = proc.returncode
        self._close_log()
        self.session.close()
        self.session = requests.Session()
        return code

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- log
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until ``text`` appears in the server log; return the log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in server log after {timeout}s; tail:\n{self.log_tail()}")
            time.sleep(0.1)

    # ---- plain HTTP
    def get(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.session.get(self.base_url + path, **kw)

    def post(self, path: str, json_body: Any = None, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.session.post(self.base_url + path, json=json_body, **kw)

    def post_frame(self, source: str, data: bytes, content_type: str = "image/png", *, prefix: str = "",
                   **query: Any) -> requests.Response:
        """``POST <prefix>/streamrt/frames/<source>`` with ``data`` as the body (a frame for Stream Frame Input:
        an image file, or raw pixels as ``application/octet-stream`` with ``width`` / ``height`` in ``query``)."""
        return self.session.post(f"{self.base_url}{prefix}/streamrt/frames/{source}", data=data, params=query or None,
                                 headers={"Content-Type": content_type}, timeout=30)

    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (all nodes), or the entry of one node class."""
        if node_class is None:
            r = self.get("/object_info", timeout=60)
            r.raise_for_status()
            return r.json()
        r = self.get(f"/object_info/{node_class}")
        r.raise_for_status()
        info = r.json()
        if node_class not in info:
            raise KeyError(f"node class {node_class!r} not known to the server")
        return info[node_class]

    def system_stats(self) -> dict:
        r = self.get("/system_stats")
        r.raise_for_status()
        return r.json()

    def queue_state(self) -> dict:
        """``GET /queue``: ``{"queue_running": [...], "queue_pending": [...]}``."""
        r = self.get("/queue")
        r.raise_for_status()
        return r.json()

    def history(self, prompt_id: str | None = None) -> dict:
        r = self.get(f"/history/{prompt_id}" if prompt_id else "/history")
        r.raise_for_status()
        return r.json()

    # ---- prompts
    def queue(self, graph: Graph | Mapping, client_id: str | None = None, *,
              extra_data: Mapping | None = None, prompt_id: str | None = None,
              front: bool = False) -> str:
        """``POST /prompt``; return the prompt id.  HTTP 400 -> :class:`PromptRejected`."""
        body: dict[str, Any] = {"prompt": as_prompt(graph), "client_id": client_id or self.client_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        if prompt_id:
            body["prompt_id"] = prompt_id
        if front:
            body["front"] = True
        r = self.post("/prompt", body)
        if r.status_code != 200:
            try:
                answer = r.json()
            except ValueError:
                answer = {"error": r.text}
            raise PromptRejected(answer, r.status_code)
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.05) -> dict:
        """Poll ``/history/<id>`` until the prompt finished; return its history entry."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.history(prompt_id)
            entry = h.get(prompt_id)
            if entry is not None and entry.get("status") is not None:
                return entry
            if not self.is_running() and self.proc is not None:
                raise ComfyError(f"server died while waiting for {prompt_id}; log tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not done after {timeout}s; queue={self.queue_state()}; "
                                   f"log tail:\n{self.log_tail(30)}")
            time.sleep(poll)

    @staticmethod
    def status_messages(entry: dict) -> list[tuple[str, dict]]:
        return [(m[0], m[1]) for m in (entry.get("status") or {}).get("messages", [])]

    @classmethod
    def raise_for_status(cls, entry: dict) -> None:
        """Raise :class:`ExecutionFailed` / :class:`ExecutionInterrupted` for a failed entry."""
        status = entry.get("status") or {}
        if status.get("status_str") != "error":
            return
        for event, data in cls.status_messages(entry):
            if event == "execution_error":
                raise ExecutionFailed(data.get("exception_message", "").strip(), data.get("node_id"),
                                      data.get("node_type"), data.get("exception_type"),
                                      data.get("traceback"), entry)
            if event == "execution_interrupted":
                raise ExecutionInterrupted("interrupted", data.get("node_id"), data.get("node_type"),
                                           "comfy.model_management.InterruptProcessingException", None, entry)
        raise ExecutionFailed(f"prompt failed without an error message: {status}", history=entry)

    def run(self, graph: Graph | Mapping, timeout: float = 120.0, client_id: str | None = None, **kw: Any) -> dict:
        """Queue, wait, raise on error; return ``history["outputs"]`` (``{node_id: ui dict}``)."""
        pid = self.queue(graph, client_id=client_id, **kw)
        entry = self.wait(pid, timeout=timeout)
        self.raise_for_status(entry)
        return entry.get("outputs", {})

    def run_entry(self, graph: Graph | Mapping, timeout: float = 120.0, client_id: str | None = None,
                  check: bool = True, **kw: Any) -> tuple[str, dict]:
        """Like :meth:`run` but return ``(prompt_id, history entry)`` (e.g. to see cached nodes)."""
        pid = self.queue(graph, client_id=client_id, **kw)
        entry = self.wait(pid, timeout=timeout)
        if check:
            self.raise_for_status(entry)
        return pid, entry

    @classmethod
    def cached_nodes(cls, entry: dict) -> set[str]:
        """Node ids the server reported in ``execution_cached`` (outputs taken from cache).

        Whether a node *ran* is best seen with websocket ``executing`` events (see
        :meth:`websocket`); history alone does not list the nodes that ran.
        """
        cached: set[str] = set()
        for event, data in cls.status_messages(entry):
            if event == "execution_cached":
                cached.update(data.get("nodes", []))
        return cached

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt`` (global, or only if ``prompt_id`` is the running prompt)."""
        r = self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        r.raise_for_status()

    def barrier(self, timeout: float = 60.0) -> None:
        """Return once the prompt worker has gone through a full loop iteration.

        Runs two tiny prompts one after the other (1x1 EmptyImage -> PreviewImage).  The
        worker handles ``/free`` flags after ``q.get()`` returns, i.e. after the prompt it
        was running; the second prompt can only start after that point, so when it is
        done every ``/free`` posted before this call has been processed.
        """
        for i in range(2):
            g = Graph(prefix="__barrier")
            img = g.node("EmptyImage", width=1, height=1, batch_size=1, color=i)
            g.node("PreviewImage", images=img.out(0))
            self.run(g, timeout=timeout)

    def free(self, unload_models: bool = True, free_memory: bool = True, wait: bool = True,
             timeout: float = 60.0) -> None:
        """``POST /free``; with ``wait`` block until the worker processed it (see :meth:`barrier`)."""
        r = self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})
        r.raise_for_status()
        if wait:
            self.barrier(timeout=timeout)

    def wait_idle(self, timeout: float = 60.0, settle: float = 0.2) -> None:
        """Wait until nothing is running or pending, then sleep ``settle`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            q = self.queue_state()
            if not q.get("queue_running") and not q.get("queue_pending"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not idle after {timeout}s: {q}")
            time.sleep(0.05)
        time.sleep(settle)

    # ---- websocket
    def websocket(self, client_id: str | None = None, feature_flags: Mapping[str, Any] | None = None) -> WSCollector:
        """Open a websocket for ``client_id`` (new id if None) collecting events in a thread (``feature_flags``:
        see :class:`WSCollector`)."""
        return WSCollector(self.host, self.port, client_id, feature_flags=feature_flags)

    # ---- images
    def view_image(self, filename: str, subfolder: str = "", type: str = "output", as_array: bool = True):
        """``GET /view``: the file as float array (``as_array``) or raw bytes."""
        r = self.get("/view", params={"filename": filename, "subfolder": subfolder, "type": type})
        r.raise_for_status()
        return image_bytes_to_array(r.content) if as_array else r.content

    def output_images(self, outputs: Mapping, node_id: str, as_array: bool = True) -> list:
        """Images listed in a node's ui output (SaveImage / PreviewImage), fetched via /view."""
        node_out = outputs.get(str(node_id)) or {}
        return [self.view_image(i["filename"], i.get("subfolder", ""), i.get("type", "output"), as_array)
                for i in node_out.get("images", [])]

    def output_file(self, image_info: Mapping) -> Path:
        """Local path of one ``{"filename", "subfolder", "type"}`` entry (output/temp/input)."""
        folders = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        base = folders[image_info.get("type", "output")]
        return base / image_info.get("subfolder", "") / image_info["filename"]

    def write_input_image(self, array: Any, name: str | None = None, subfolder: str = "") -> str:
        """Write an image (float [0,1] or uint8 array, or PNG bytes) into ``<work>/input``.

        Returns the name LoadImage expects (``"sub/name.png"`` when in a subfolder).
        """
        name = name or f"img_{uuid.uuid4().hex[:8]}.png"
        data = array if isinstance(array, (bytes, bytearray)) else array_to_png_bytes(array)
        folder = self.input_dir / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        return f"{subfolder}/{name}" if subfolder else name

    def clear_outputs(self) -> None:
        for d in (self.output_dir,):
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True, exist_ok=True)


__all__ = [
    "ComfyServer", "Graph", "NodeRef", "WSCollector", "ComfyError", "ServerStartError", "PromptRejected",
    "ExecutionFailed", "ExecutionInterrupted", "MODEL_FOLDERS", "comfyui_dir", "server_python", "free_port",
    "image_bytes_to_array", "load_image_array", "array_to_png_bytes", "as_prompt", "decode_preview",
]
