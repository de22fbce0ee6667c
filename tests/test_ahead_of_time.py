"""``compile`` through packages compiled ahead of time (streamrt/runtime/ahead_of_time.py), on the CPU, with
inductor for real (AOTInductor builds C++ here; tests/test_gpu.py does the same on a GPU):

- a compiled stream's frames are the eager stream's; its UNet and VAE calls run from packages written under the
  compile cache's ``aot`` folder, which hold no weights;
- a new process loads those packages and compiles nothing (the restart, issue #17): scripts/compile_restart.py's
  warm process reaches its first frame without compiling or tracing;
- weights changed in place after the packages were loaded are what the next frame uses (small ones too, which
  inductor would otherwise copy into its kernels);
- before a process loads a package the first time, a separate process loads and runs it: a damaged package (or
  one this torch cannot load, which has ended processes with a segmentation fault) is refused with the reason, its
  call stays on ``torch.compile``, the frames stay right, and the verdict is kept for the next process;
- the package key changes with what the compiled code depends on (a weight's layout, the call's extras) and not
  with the weights' values;
- cached attention keeps ``torch.compile`` and says so.

The packages of the module's tests share one cache folder, so each is compiled once (about a minute in all).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stream_helpers import frame_groups, make_config, quiet_load, run_steps

from streamrt import Stream, prepare
from streamrt.kv_cache import KVCacheConfig
from streamrt.runtime import CompileOptions, TorchUNet
from streamrt.runtime.ahead_of_time import AheadOfTimeUNet, AheadOfTimeVae, _UNetCall, environment_key, package_key

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a cat"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compile_cache")


@pytest.fixture(scope="module")
def eager_frames(tiny_models) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    inputs = frame_groups(4, 1, seed=3)
    return inputs, run_steps(Stream(tiny_models, make_config(acceleration="eager"), prompt=PROMPT), inputs)


def compiled_stream(models, cache_dir: Path, **changes) -> Stream:
    config = make_config(acceleration="compile", **changes)
    options = CompileOptions(cache_dir=str(cache_dir), ahead_of_time=True)
    return Stream(models, config, prompt=PROMPT, runtime=prepare(models, config, compile_options=options))


def packages(cache_dir: Path) -> dict[str, Path]:
    return {p.name.split("-")[0]: p for p in sorted((cache_dir / "aot").glob("*.pt2"))}


class Messages(logging.Handler):
    """The messages of the ahead-of-time module's logger while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        log = logging.getLogger("streamrt.runtime.ahead_of_time")
        self.level, log.level = log.level, logging.INFO
        log.addHandler(self)
        return self.messages

    def __exit__(self, *exc) -> None:
        log = logging.getLogger("streamrt.runtime.ahead_of_time")
        log.removeHandler(self)
        log.level = self.level


@pytest.fixture(scope="module")
def first_run(tiny_models, cache_dir, eager_frames) -> tuple[Stream, list[torch.Tensor], list[str]]:
    """A compiled stream's frames on an empty cache (its packages are compiled), and what it logged."""
    with Messages() as messages:
        stream = compiled_stream(tiny_models, cache_dir)
        got = run_steps(stream, eager_frames[0])
    return stream, got, messages


def test_compiled_stream_runs_from_packages_and_matches_eager(tiny_models, cache_dir, eager_frames, first_run):
    stream, got, messages = first_run
    assert isinstance(stream.runtime.unet, AheadOfTimeUNet) and isinstance(stream.runtime.encode, AheadOfTimeVae)
    assert stream.runtime.parts == {"unet": "compiled", "vae_encoder": "compiled", "vae_decoder": "compiled"}
    assert not stream.runtime.unet.packages.problems
    # the first frame of any compiled stream differs from eager's by rounding amplified through an empty stream
    # buffer (tests/test_runtime.py compares from the second on, too)
    for a, b in zip(got[1:], eager_frames[1][1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    found = packages(cache_dir)
    assert set(found) == {"unet", "vae_encoder", "vae_decoder"}
    assert sum("ahead of time in" in m for m in messages) == 3, messages  # each compiled once
    # and loaded and run in a separate process before this one loaded it
    assert sum(m.startswith("checked ") and "in a separate process" in m for m in messages) == 3, messages
    assert all(path.with_suffix(".checked").is_file() for path in found.values())
    # weights are bound at load, not packed: a package is far smaller than the UNet's weights
    weights = sum(t.numel() * t.element_size() for t in tiny_models.unet.parameters())
    assert found["unet"].stat().st_size < weights


def test_a_second_stream_loads_the_packages_and_compiles_nothing(fresh_tiny_models, cache_dir, eager_frames,
                                                                 first_run):
    inputs, expected = eager_frames
    with Messages() as messages:
        got = run_steps(compiled_stream(fresh_tiny_models, cache_dir), inputs)  # another pipeline, same architecture
    assert not any("ahead of time in" in m or m.startswith("checked ") for m in messages), messages
    assert sum(m.startswith("loaded the ahead-of-time package") for m in messages) == 3, messages
    for a, b in zip(got[1:], expected[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_weights_changed_in_place_reach_the_packages(tiny_folders, cache_dir, first_run):
    models = quiet_load(tiny_folders["tiny"])
    eager = Stream(models, make_config(acceleration="eager"), prompt=PROMPT)
    compiled = compiled_stream(models, cache_dir)
    inputs = frame_groups(3, 1, seed=5)
    for frame in inputs[:2]:
        eager.step(frame), compiled.step(frame)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # conv_out's bias has 4 values: small enough for inductor to inline unless told not to
        for tensor in (models.unet.conv_out.bias, models.unet.conv_in.weight, models.vae.decoder.conv_out.bias):
            tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
    before = eager.step(inputs[2]).clone()
    torch.testing.assert_close(compiled.step(inputs[2]), before, rtol=0, atol=1e-5)


def test_a_damaged_package_leaves_the_call_on_torch_compile(tiny_models, cache_dir, eager_frames, first_run,
                                                           tmp_path, caplog):
    found = packages(cache_dir)
    damaged = tmp_path / "cache"
    (damaged / "aot").mkdir(parents=True)
    for name, path in found.items():
        target = damaged / "aot" / path.name
        target.write_bytes(b"not a package" if name == "unet" else path.read_bytes())
        for suffix in (".json", ".checked"):
            (damaged / "aot" / path.with_suffix(suffix).name).write_bytes(path.with_suffix(suffix).read_bytes())
    (damaged / "aot" / found["unet"].with_suffix(".checked").name).unlink()  # the damaged one was never checked
    inputs, expected = eager_frames
    with caplog.at_level(logging.WARNING, logger="streamrt.runtime.ahead_of_time"):
        stream = compiled_stream(tiny_models, damaged)
        got = run_steps(stream, inputs)
    problems = stream.runtime.unet.packages.problems
    assert len(problems) == 1 and problems[0].startswith("unet: not compiled ahead of time") and \
        "does not load or run in a separate process" in problems[0] and "torch.compile runs it" in problems[0]
    ours = [r.getMessage() for r in caplog.records if r.name == "streamrt.runtime.ahead_of_time"]
    assert [m for m in ours if m.startswith("StreamRT: ")] == [f"StreamRT: {problems[0]}"]
    for a, b in zip(got[1:], expected[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the verdict is kept: a later stream (a restarted server) refuses the package without checking it again
    failed = damaged / "aot" / found["unet"].with_suffix(".failed").name
    assert failed.is_file() and failed.read_text().startswith("exit status 1")
    with Messages() as messages:
        again = compiled_stream(tiny_models, damaged)
        run_steps(again, inputs[:2])
    assert again.runtime.unet.packages.problems == problems
    assert not any(m.startswith("checked ") for m in messages)


def test_package_key_follows_what_the_compiled_code_depends_on(tiny_folders):
    a, b = quiet_load(tiny_folders["tiny"]), quiet_load(tiny_folders["tiny"])
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([999.0, 500.0]), torch.randn(2, 77, 32))
    cpu = torch.device("cpu")

    def key(models, signature=("unet", False, 0, 0, False), args=inputs) -> str:
        wrapper = _UNetCall(models.unet, added=False, residuals=0, prompt_layers=0, fused_qkv=False)
        return package_key(wrapper, signature, args, cpu)

    with torch.no_grad():
        b.unet.conv_in.weight.mul_(2.0)
    assert key(a) == key(b)  # other weight values: the same package
    assert key(a) != key(a, signature=("unet", False, 0, 0, True))
    assert key(a) != key(a, args=(inputs[0][:1], inputs[1][:1], inputs[2][:1]))
    b.unet.to(memory_format=torch.channels_last)
    assert key(a) != key(b)  # another weight layout: another package


def test_cached_attention_keeps_torch_compile_and_says_so(tiny_models, cache_dir):
    config = make_config(acceleration="compile", kv_cache=KVCacheConfig(enabled=True, window=2))
    runtime = prepare(tiny_models, config, compile_options=CompileOptions(cache_dir=str(cache_dir), ahead_of_time=True))
    assert isinstance(runtime.unet, TorchUNet) and isinstance(runtime.decode, AheadOfTimeVae)
    assert any("cached attention runs through torch.compile" in note for note in runtime.notes)


def test_restart_loads_the_packages_in_a_new_process(tmp_path):
    """scripts/compile_restart.py on the tiny model: the warm process compiles nothing, and its compiled part (from
    the stream made to the first frame) is a small part of the cold one's."""
    out = tmp_path / "restart.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "compile_restart.py"), "--device", "cpu",
                           "--size", "64", "--work", str(tmp_path / "work"), "--json", str(out), "--ahead-of-time"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    log = done.stderr
    assert log.count("cold: ") and "warm: " in log
    assert sum("cold: " in line and "ahead of time in" in line for line in log.splitlines()) == 3
    assert not any("warm: " in line and "ahead of time in" in line for line in log.splitlines())
    assert sum("warm: " in line and "loaded the ahead-of-time package" in line for line in log.splitlines()) == 3
    cold, warm = runs["cold"]["first_frame_after_stream_s"], runs["warm"]["first_frame_after_stream_s"]
    assert warm < cold / 10, (cold, warm)


def test_a_torch_that_crashed_a_check_compiles_no_more_packages(tiny_models, eager_frames, tmp_path):
    """The verdict a crashed check leaves (tests/test_gpu.py and BENCHMARKS.md: torch 2.11's loader on the H200
    machine) stops every later package for that torch and device from being compiled: the calls go straight to
    torch.compile, and the message says how to try again."""
    folder = tmp_path / "cache" / "aot"
    folder.mkdir(parents=True)
    marker = folder / f"environment-{environment_key(torch.device('cpu'))}.unusable"
    marker.write_text("vae_encoder-0.pt2: killed by SIGSEGV: Fatal Python error: Segmentation fault\n")
    inputs, expected = eager_frames
    with Messages() as messages:
        stream = compiled_stream(tiny_models, tmp_path / "cache")
        got = run_steps(stream, inputs)
    assert not any("ahead of time in" in m or m.startswith("checked ") for m in messages), messages
    assert sorted(p.name for p in folder.iterdir()) == [marker.name]  # nothing compiled
    for packages_of in (stream.runtime.unet.packages, stream.runtime.encode.packages, stream.runtime.decode.packages):
        assert len(packages_of.problems) == 1 and "Segmentation fault" in packages_of.problems[0]
        assert f"delete {marker} to try again" in packages_of.problems[0]
    for a, b in zip(got[1:], expected[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
