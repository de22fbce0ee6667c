"""Build one TensorRT or TensorRT-RTX engine from an ONNX file, in a process of its own.

Run by :func:`streamrt.engines.build.run_build` as ``python _build_worker.py JOB.json``; not imported
by the package (it needs only the standard library, polygraphy and the backend). A process per
build because polygraphy picks ``tensorrt`` or ``tensorrt_rtx`` once, at import, from
``POLYGRAPHY_USE_TENSORRT_RTX``; and because killing it is the one reliable way to stop a build.

Protocol: lines on stdout that start with ``@@streamrt-build`` carry one JSON event each
(``start``, ``progress`` with a ``fraction`` in [0, 1], ``done``, ``error``); every other line is
log output of polygraphy / TensorRT.

Job fields: ``onnx``, ``output`` (the engine file to write), ``backend`` (``tensorrt-rtx`` |
``tensorrt``), ``target`` (``[major, minor]`` for TensorRT-RTX, ``null`` for the local GPU),
``profiles`` (a list of ``{input: [min, opt, max]}``), ``timing_cache`` (path or null),
``optimization_level`` (int or null), ``require_user_allocation`` (bool, TensorRT-RTX: engines that
can be captured in CUDA graphs).
"""

from __future__ import annotations

import json
import os
import sys
import time

PREFIX = "@@streamrt-build "


def emit(event: str, **data) -> None:
    sys.stdout.write(PREFIX + json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


def _monitor_class(trt):
    class Monitor(trt.IProgressMonitor):
        """Nested build phases folded into one fraction: outer phases reported at once, the rest at most
        every 0.2 s."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._stack: list[list] = []  # [name, steps, done]
            self._last = 0.0
            self._best = 0.0

        def _fraction(self) -> float:
            frac, width = 0.0, 1.0
            for _name, steps, done in self._stack:
                steps = max(int(steps), 1)
                frac += width * min(done, steps) / steps
                width /= steps
            return min(frac, 1.0)

        def _report(self, force: bool = False) -> None:
            now = time.monotonic()
            frac = max(self._best, self._fraction())  # nested phases may restart: never go back
            if force or now - self._last > 0.2:
                self._best, self._last = frac, now
                phase = self._stack[-1][0] if self._stack else ""
                emit("progress", fraction=round(frac, 4), phase=phase)

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._stack.append([phase_name, num_steps, 0])
            self._report(force=len(self._stack) <= 2)  # outer phases always; inner ones throttled

        def step_complete(self, phase_name, step):
            for entry in reversed(self._stack):
                if entry[0] == phase_name:
                    entry[2] = int(step) + 1
                    break
            self._report()
            return True  # keep going; the parent stops a build by ending this process

        def phase_finish(self, phase_name):
            while self._stack:
                name = self._stack.pop()[0]
                if name == phase_name:
                    break
            self._report(force=len(self._stack) <= 1)

    return Monitor


def build(job: dict) -> None:
    rtx = job["backend"] == "tensorrt-rtx"
    # must be set before polygraphy is imported: it picks the TensorRT module once
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if rtx else "0"
    os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.logger import G_LOGGER
    from polygraphy.mod.trt_importer import lazy_import_trt

    G_LOGGER.module_severity = G_LOGGER.WARNING
    trt = lazy_import_trt()
    emit("start", version=trt.__version__, pid=os.getpid())

    profiles = []
    for spec in job["profiles"]:
        profile = Profile()
        for name, (lo, opt, hi) in spec.items():
            profile.add(name, tuple(lo), tuple(opt), tuple(hi))
        profiles.append(profile)
    options = dict(profiles=profiles, progress_monitor=_monitor_class(trt)(),
                   load_timing_cache=job.get("timing_cache"))
    if job.get("optimization_level") is not None:
        options["builder_optimization_level"] = int(job["optimization_level"])
    if rtx:
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        major, minor = job["target"]
        create = CreateConfigRTX(compute_capabilities=[(int(major), int(minor))], **options)
    else:
        if job.get("target") is not None:
            raise ValueError("full TensorRT builds for the local GPU only; target must be null")
        create = CreateConfig(**options)

    def make_config(builder, network):
        config = create(builder, network)
        flag = getattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION", None)
        if rtx and job.get("require_user_allocation") and flag is not None:
            config.set_flag(flag)
        return config

    emit("progress", fraction=0.0, phase="parsing ONNX")
    # strongly typed: the ONNX graph's own dtypes (fp16 or fp32) are the engine's precision
    network = network_from_onnx_path(job["onnx"], strongly_typed=True)
    start = time.monotonic()
    serialized = engine_bytes_from_network(network, config=make_config, save_timing_cache=job.get("timing_cache"))
    seconds = time.monotonic() - start
    data = memoryview(serialized)
    with open(job["output"], "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    emit("done", bytes=data.nbytes, seconds=round(seconds, 3), version=trt.__version__)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: _build_worker.py JOB.json\n")
        return 2
    try:
        with open(argv[1], encoding="utf-8") as f:
            job = json.load(f)
        build(job)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
