"""The engine cache on its own (no TensorRT needed): names, keys, atomic commits, verification, listing.

Engine files here are stand-in bytes; real TensorRT-RTX builds through the cache are in
tests/test_engine_build.py.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streamrt import StreamModels
from streamrt.engines import (
    ENGINE_FORMAT,
    EngineCache,
    EngineKey,
    EngineNameError,
    EngineShapes,
    InvalidEngineError,
    weights_fingerprint,
)
from streamrt.engines import cache as cache_mod
from streamrt.engines.spec import DimRange


def make_key(**changes) -> EngineKey:
    base = dict(weights="tiny-sd-0123456789abcdef", family="sd1", component="unet",
                shapes=EngineShapes.static(2, 512, 512),
                precision="fp16", backend="tensorrt-rtx", backend_version="1.7.1.116", target="SM89", cache_window=0)
    base.update(changes)
    return EngineKey(**base)


@pytest.fixture
def cache(tmp_path: Path) -> EngineCache:
    return EngineCache(tmp_path / "engines")


def store(cache: EngineCache, key: EngineKey, payload: bytes = b"engine-bytes" * 100) -> Path:
    with cache.staging() as staging:
        built = staging / "engine.part"
        built.write_bytes(payload)
        return cache.commit(key, built, {"build_seconds": 0.0}).path


# --------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", [
    "../evil.engine", "a/../../evil.engine", "..", "../..", "/etc/passwd", "a/b/c.engine", "C:/x.engine",
    "a\\..\\b.engine", ".hidden/x.engine", "a/.x.engine", "", "a//b.engine", "a/./b.engine", "a/b\x00.engine",
    "a/b c.engine", "~/x.engine",
])
def test_names_that_could_escape_are_refused(cache, name) -> None:
    with pytest.raises(EngineNameError):
        cache.resolve(name)


def test_symlink_out_of_the_folder_is_refused(cache, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    cache.root.mkdir(parents=True)
    (cache.root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(EngineNameError, match="outside"):
        cache.resolve("link/x.engine")
    assert cache.resolve("model-1/unet_x.engine") == cache.root / "model-1" / "unet_x.engine"


def test_key_names_are_safe_even_from_odd_inputs(cache) -> None:
    key = make_key(weights="../../etc", backend_version="1.7/../../x", target="SM89")
    path = cache.engine_path(key)
    assert path.is_relative_to(cache.root) and ".." not in path.relative_to(cache.root).parts


# ---------------------------------------------------------------------------------------------- keys
def test_key_json_round_trip_and_digest() -> None:
    key = make_key(shapes=EngineShapes(DimRange(1, 2, 4), DimRange(256, 512, 768), DimRange(256, 512, 1024),
                                       (("kv_tokens", DimRange(64, 128, 256)),)), cache_window=4)
    again = EngineKey.from_json(json.loads(json.dumps(key.to_json())))
    assert again == key and again.digest() == key.digest()
    assert key.file_name().endswith(".engine") and "kv4" in key.file_name()


@pytest.mark.parametrize("field,value", [
    ("weights", "other-model-fedcba9876543210"), ("family", "sdxl"), ("component", "vae_decoder"),
    ("shapes", EngineShapes.static(3, 512, 512)), ("shapes", EngineShapes.static(2, 768, 512)),
    ("shapes", EngineShapes.ranged(2, 512, 512, 256, 768)), ("cache_window", 4), ("precision", "fp32"),
    ("backend", "tensorrt"), ("backend_version", "1.6.1.120"), ("target", "SM86"), ("format", ENGINE_FORMAT + 1),
])
def test_every_key_field_changes_the_engine_name(field, value) -> None:
    base, changed = make_key(), replace(make_key(), **{field: value})
    assert changed.digest() != base.digest() and changed.file_name() != base.file_name()
    assert any(d.startswith(field) for d in base.differences(changed))


# ------------------------------------------------------------------------------------------- commits
def test_commit_then_verified_lookup(cache) -> None:
    key = make_key()
    assert not cache.lookup(key).hit and cache.lookup(key).error.reason == "missing"
    path = store(cache, key)
    found = cache.lookup(key)
    assert found.hit and found.record.path == path
    meta = json.loads(cache.meta_path(path).read_text())
    assert meta["key"] == key.to_json() and meta["engine"]["bytes"] == path.stat().st_size
    assert len(meta["engine"]["sha256"]) == 64
    assert not list((cache.root / ".staging").iterdir()), "the staging folder is removed after the commit"


def test_failed_move_leaves_no_engine(cache, monkeypatch) -> None:
    key = make_key()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store(cache, key)
    monkeypatch.undo()
    assert not cache.lookup(key).hit
    assert not list(cache.root.rglob("*.engine")) and not list(cache.root.rglob("*.json"))
    assert not list((cache.root / ".staging").iterdir())


def test_exception_inside_staging_removes_it(cache) -> None:
    with pytest.raises(KeyboardInterrupt), cache.staging() as staging:
        (staging / "engine.part").write_bytes(b"partial")
        raise KeyboardInterrupt
    assert not list((cache.root / ".staging").iterdir())


def test_leftover_staging_of_a_killed_process_is_cleaned(cache) -> None:
    old = cache.root / ".staging" / "12345-deadbeef"
    old.mkdir(parents=True)
    (old / "engine.part").write_bytes(b"x")
    past = time.time() - cache_mod.STALE_STAGING_SECONDS - 10
    os.utime(old, (past, past))
    with cache.staging():
        pass
    assert not old.exists()


def test_empty_engine_is_refused(cache) -> None:
    with cache.staging() as staging:
        (staging / "e").write_bytes(b"")
        with pytest.raises(cache_mod.EngineCacheError, match="empty"):
            cache.commit(make_key(), staging / "e")


# -------------------------------------------------------------------------------------- verification
def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,reason,message", [
    ("truncate", "corrupt", "truncated"), ("flip", "corrupt", "sha256"),
])
def test_damaged_engine_is_caught(cache, how, reason, message) -> None:
    key = make_key()
    path = store(cache, key)
    assert cache.lookup(key).hit
    time.sleep(0.01)
    corrupt(path, how)
    found = cache.lookup(key)
    assert not found.hit and found.error.reason == reason and message in str(found.error)
    with pytest.raises(InvalidEngineError, match="Build Engines"):
        cache.load(key)


def test_engine_without_metadata_is_not_used(cache) -> None:
    key = make_key()
    path = store(cache, key)
    cache.meta_path(path).unlink()
    found = cache.lookup(key)
    assert found.error.reason == "metadata" and "interrupted" in str(found.error)


def test_unreadable_metadata(cache) -> None:
    key = make_key()
    path = store(cache, key)
    cache.meta_path(path).write_text("{not json")
    assert cache.lookup(key).error.reason == "metadata"


@pytest.mark.parametrize("field,value,reason", [
    ("target", "SM86", "stale"), ("backend_version", "1.6.1.120", "stale"), ("component", "vae_encoder", "mismatch"),
])
def test_engine_for_another_key_is_caught(cache, field, value, reason) -> None:
    key = make_key()
    other = replace(key, **{field: value})
    path = store(cache, other)
    with pytest.raises(InvalidEngineError, match=field) as caught:
        cache.verify(path, key)
    assert caught.value.reason == reason
    assert not cache.lookup(key).hit and cache.lookup(key).error.reason == "missing"


@pytest.mark.parametrize("field,value", [
    ("target", "SM86"), ("backend_version", "1.6.1.120"), ("component", "vae_encoder"),
    ("shapes", EngineShapes.static(2, 768, 768)), ("shapes", EngineShapes.ranged(2, 512, 512, 256, 1024)),
    ("weights", "other-model-fedcba9876543210"), ("cache_window", 4), ("precision", "fp32"), ("family", "sdxl"),
])
def test_sidecar_edited_to_claim_another_key_is_not_trusted(cache, field, value) -> None:
    key = make_key(shapes=EngineShapes.ranged(2, 512, 512, 256, 768))
    path = store(cache, key)
    meta = json.loads(cache.meta_path(path).read_text())
    meta["key"] = replace(key, **{field: value}).to_json()        # the engine's sha256 and size still match
    cache.meta_path(path).write_text(json.dumps(meta))
    found = cache.lookup(key)
    assert not found.hit and found.error.reason == "metadata" and "does not belong" in str(found.error)
    with pytest.raises(InvalidEngineError, match="does not belong") as caught:
        cache.verify(path)
    assert caught.value.reason == "metadata"
    claimed = replace(key, **{field: value})
    [entry] = cache.entries(key.weights)
    assert entry.record is None and entry.error.reason == "metadata"
    assert cache.entries(claimed.weights) == [] or all(e.record is None for e in cache.entries(claimed.weights))
    for weights in {key.weights, claimed.weights}:
        for component in ("unet", "vae_encoder"):
            for width, height, rows in ((512, 512, 2), (768, 768, 2), (640, 384, 2)):
                assert cache.find(weights, component, rows=rows, width=width, height=height,
                                  cache_window=claimed.cache_window) == []


def test_older_engine_format_is_stale(cache, monkeypatch) -> None:
    old = make_key(format=ENGINE_FORMAT - 1)
    monkeypatch.setattr(cache_mod, "ENGINE_FORMAT", ENGINE_FORMAT - 1)  # stored by an older StreamRT
    path = store(cache, old)
    monkeypatch.undo()
    with pytest.raises(InvalidEngineError, match="format") as caught:
        cache.verify(path)
    assert caught.value.reason == "stale"
    [entry] = cache.entries(old.weights)
    assert entry.error.reason == "stale" and cache.lookup(old).error.reason == "stale"
    assert cache.lookup(replace(old, format=ENGINE_FORMAT)).error.reason == "missing"


def test_engine_of_the_format_before_families_is_stale(cache) -> None:
    """An engine stored by format 1 (keys without a family): reported stale (rebuilt on request), not as a sidecar
    that describes another engine, even though its key lacks a field of this format's."""
    key = make_key()
    path = store(cache, key)
    meta = json.loads(cache.meta_path(path).read_text())
    del meta["key"]["family"]
    meta["key"]["format"] = 1
    meta["streamrt_engine"] = 1
    cache.meta_path(path).write_text(json.dumps(meta))
    with pytest.raises(InvalidEngineError, match=f"format 1, this version uses {ENGINE_FORMAT}") as caught:
        cache.verify(path)
    assert caught.value.reason == "stale" and ENGINE_FORMAT >= 2
    assert cache.lookup(key).error.reason == "stale"
    [entry] = cache.entries(key.weights)
    assert entry.record is None and entry.error.reason == "stale"


def _set_raw(meta_path: Path, where: tuple[str, ...], raw: str) -> None:
    """Set ``meta[where...]`` to the raw JSON text ``raw`` (values json.dumps cannot write, like 1e999)."""
    meta = json.loads(meta_path.read_text())
    target = meta
    for part in where[:-1]:
        target = target[part]
    target[where[-1]] = "@RAW@"
    meta_path.write_text(json.dumps(meta).replace('"@RAW@"', raw))


#: hostile sidecars: how to damage one, and what the error must name
HOSTILE_SIDECARS = {
    "bytes-inf": (lambda m: _set_raw(m, ("engine", "bytes"), "1e999"), "engine.bytes"),
    "window-inf": (lambda m: _set_raw(m, ("key", "cache_window"), "1e999"), "OverflowError"),
    "rows-inf": (lambda m: _set_raw(m, ("key", "shapes", "rows"), "[1e999, 1e999, 1e999]"), "OverflowError"),
    "deep-nesting": (lambda m: m.write_text('{"key": ' + "[" * 100_000 + "]" * 100_000 + "}"), "RecursionError"),
    "huge-int": (lambda m: _set_raw(m, ("engine", "bytes"), "9" * 5000), "malformed"),
    "pixel-zero": (lambda m: _set_raw(m, ("pixel_multiple",), "0"), "pixel_multiple"),
    "pixel-negative": (lambda m: _set_raw(m, ("pixel_multiple",), "-64"), "pixel_multiple"),
    "pixel-text": (lambda m: _set_raw(m, ("pixel_multiple",), '"64"'), "pixel_multiple"),
    "inputs": (lambda m: _set_raw(m, ("inputs",), "[5]"), "inputs"),
    "sha-number": (lambda m: _set_raw(m, ("engine", "sha256"), "12"), "sha256"),
    "array": (lambda m: m.write_text("[]"), "not a JSON object"),
    "fifo": (lambda m: (m.unlink(), os.mkfifo(m)), "not a regular file"),
}


def _in_time(fn, seconds: float = 20.0):
    """``fn()`` in a thread, failing the test (not hanging it) when it does not return in time."""
    import threading

    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} did not return within {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def _unblock_fifo(path: Path) -> None:
    """Let a reader blocked on opening the FIFO ``path`` go (a writer opens and closes it)."""
    if path.exists() and not path.is_file():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


@pytest.mark.parametrize("damage", list(HOSTILE_SIDECARS))
def test_hostile_sidecar_rules_out_that_engine_only(cache, damage) -> None:
    if damage == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    how, problem = HOSTILE_SIDECARS[damage]
    good = make_key(shapes=EngineShapes.static(2, 512, 512))
    bad = make_key(shapes=EngineShapes.ranged(2, 512, 512, 256, 768))
    store(cache, good)
    with cache.staging() as staging:
        (staging / "e").write_bytes(b"engine-bytes" * 100)
        bad_path = cache.commit(bad, staging / "e", {"pixel_multiple": 64, "inputs": [["sample", [1], "fp16"]]}).path
    meta_path = cache.meta_path(bad_path)
    how(meta_path)
    try:
        entries = _in_time(lambda: cache.entries(good.weights))
        found = _in_time(lambda: cache.find(good.weights, "unet", rows=2, width=512, height=512))
        looked = _in_time(lambda: cache.lookup(bad))
    finally:
        _unblock_fifo(meta_path)
    assert [e.record.key for e in entries if e.record] == [good]
    [error] = [e.error for e in entries if e.record is None]
    assert error.reason == "metadata" and problem in str(error) and error.path == bad_path
    assert [r.key for r in found] == [good]
    assert not looked.hit and looked.error.reason == "metadata" and problem in str(looked.error)
    with pytest.raises(InvalidEngineError, match="Build Engines"):
        cache.load(bad)


@pytest.fixture
def fake_builds(monkeypatch):
    """ensure_engine with the export and the TensorRT build replaced by stand-ins (no TensorRT needed):
    yields the list of builds it ran."""
    from types import SimpleNamespace

    from streamrt.engines import build as build_mod

    builds = []

    def export_onnx(component, shapes, path, **kwargs):
        Path(path).write_bytes(b"onnx")
        return SimpleNamespace(path=Path(path), seconds=0.0, external_data=False, opset=17)

    def run_build(job, progress=None, **kwargs):
        builds.append(job)
        job.output.write_bytes(b"rebuilt-engine" * 50)
        return build_mod.BuildOutcome(seconds=0.0, bytes=job.output.stat().st_size, version="1.7.1.116", log_tail="")

    monkeypatch.setattr(build_mod, "backend_version", lambda backend: "1.7.1.116")
    monkeypatch.setattr(build_mod, "require_polygraphy", lambda: None)
    monkeypatch.setattr(build_mod, "export_onnx", export_onnx)
    monkeypatch.setattr(build_mod, "run_build", run_build)
    return builds


@pytest.mark.parametrize("damage", ["window-inf", "deep-nesting", "pixel-zero", "fifo"])
def test_engine_with_a_hostile_sidecar_is_rebuilt(cache, fake_builds, damage) -> None:
    from engine_helpers import tiny_stream_models

    from streamrt.engines import EngineRequest, engine_key, ensure_engine

    models = tiny_stream_models()
    request = EngineRequest("vae_decoder", EngineShapes.ranged(1, 64, 64, 64, 128), target="SM89")
    key = engine_key(models, request)
    path = store(cache, key)
    meta_path = cache.meta_path(path)
    HOSTILE_SIDECARS[damage][0](meta_path)
    try:
        result = _in_time(lambda: ensure_engine(models, request, cache))
    finally:
        _unblock_fifo(meta_path)
    assert result.built and len(fake_builds) == 1 and result.reason.startswith("rebuilt")
    assert cache.lookup(key).hit and cache.lookup(key).record.path == path
    assert [r.key for r in cache.find(key.weights, "vae_decoder", rows=1, width=64, height=128)] == [key]


def test_verified_engines_are_not_hashed_again(cache, monkeypatch) -> None:
    key = make_key()
    store(cache, key)
    calls = []
    original = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p, *a: calls.append(p) or original(p, *a))
    for _ in range(3):
        assert cache.lookup(key).hit
    assert calls == []


# ----------------------------------------------------------------------------------- links out of the cache
def test_staging_folder_that_is_a_link_is_refused_and_nothing_is_deleted_through_it(cache, tmp_path) -> None:
    outside = tmp_path / "precious"
    (outside / "old-work").mkdir(parents=True)
    (outside / "old-work" / "thesis.txt").write_text("years of work")
    (outside / "notes.txt").write_text("keep")
    past = time.time() - cache_mod.STALE_STAGING_SECONDS - 10
    for p in (outside / "old-work", outside / "notes.txt"):
        os.utime(p, (past, past))
    cache.root.mkdir(parents=True)
    (cache.root / ".staging").symlink_to(outside, target_is_directory=True)
    with pytest.raises(cache_mod.EngineCacheError, match="link"):
        cache.clean_staging()
    with pytest.raises(cache_mod.EngineCacheError, match="link"), cache.staging():
        pass
    with pytest.raises(cache_mod.EngineCacheError, match="link"):
        store(cache, make_key())
    assert sorted(p.name for p in outside.iterdir()) == ["notes.txt", "old-work"]   # nothing deleted or created
    assert (outside / "old-work" / "thesis.txt").read_text() == "years of work"


def test_links_inside_the_staging_folder_are_not_followed(cache, tmp_path) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    base = cache.root / ".staging"
    base.mkdir(parents=True)
    link = base / "99-deadbeef"
    link.symlink_to(outside, target_is_directory=True)
    past = time.time() - cache_mod.STALE_STAGING_SECONDS - 10
    os.utime(link, (past, past), follow_symlinks=False)
    os.utime(outside, (past, past))
    assert cache.clean_staging() == 1
    assert not link.is_symlink() and (outside / "keep.txt").read_text() == "keep"


def _outside_engine(tmp_path: Path, key: EngineKey) -> Path:
    """An engine for ``key``, with its sidecar, in a cache folder that is not ``cache``'s."""
    return store(EngineCache(tmp_path / "elsewhere"), key)


def _count_hashes(monkeypatch) -> list:
    calls: list = []
    original = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p, *a: calls.append(p) or original(p, *a))
    return calls


@pytest.mark.parametrize("link", ["weights-folder", "engine", "sidecar"])
def test_links_out_of_the_cache_are_refused_not_read(cache, tmp_path, monkeypatch, link) -> None:
    key = make_key()
    target = _outside_engine(tmp_path, key)
    folder = cache.root / cache_mod.weights_folder(key.weights)
    if link == "weights-folder":
        cache.root.mkdir(parents=True)
        folder.symlink_to(target.parent, target_is_directory=True)
        listed = folder
    else:
        folder.mkdir(parents=True)
        engine, sidecar = folder / target.name, cache.meta_path(folder / target.name)
        engine.write_bytes(target.read_bytes())
        sidecar.write_bytes(cache.meta_path(target).read_bytes())
        link_path, real = (engine, target) if link == "engine" else (sidecar, cache.meta_path(target))
        link_path.unlink()
        link_path.symlink_to(real)
        listed = engine
    hashed = _count_hashes(monkeypatch)
    for entries in (cache.entries(key.weights), cache.entries()):
        [entry] = entries
        assert entry.record is None and entry.path == listed
        assert entry.error.reason == "outside" and "outside the engine cache" in str(entry.error)
    assert cache.find(key.weights, "unet", rows=2, width=512, height=512) == []
    found = cache.lookup(key)
    assert not found.hit and found.error.reason == "outside" and "outside the engine cache" in str(found.error)
    assert hashed == []


def test_no_build_through_a_link_out_of_the_cache(cache, tmp_path, fake_builds) -> None:
    from engine_helpers import tiny_stream_models

    from streamrt.engines import EngineRequest, engine_key, ensure_engine

    models = tiny_stream_models()
    request = EngineRequest("vae_decoder", EngineShapes.static(1, 64, 64), target="SM89")
    key = engine_key(models, request)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache.root.mkdir(parents=True)
    (cache.root / cache_mod.weights_folder(key.weights)).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(cache_mod.EngineCacheError, match="outside"):
        ensure_engine(models, request, cache)
    assert fake_builds == [] and list(elsewhere.iterdir()) == []


def _replace_keeping_mtime(path: Path, data: bytes) -> None:
    """Put a new file with ``data`` at ``path`` (another inode) with the old file's mtime_ns."""
    st = path.stat()
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, path)
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_engines_are_verified_once_per_file_identity(cache, monkeypatch) -> None:
    key = make_key()
    path = store(cache, key)
    hashed = _count_hashes(monkeypatch)
    for _ in range(3):
        assert cache.verify(path, key).key == key and cache.lookup(key).hit
    assert hashed == []                                                   # unchanged: not hashed again
    sidecar = cache.meta_path(path)
    _replace_keeping_mtime(sidecar, sidecar.read_bytes())                 # another sidecar file, same bytes
    assert cache.lookup(key).hit and len(hashed) == 1
    assert cache.lookup(key).hit and len(hashed) == 1
    # another file of the same size put in its place with the same mtime: hashed again, and caught
    data = bytearray(path.read_bytes())
    data[7] ^= 0xFF
    _replace_keeping_mtime(path, bytes(data))
    found = cache.lookup(key)
    assert len(hashed) == 2 and not found.hit and found.error.reason == "corrupt"
    # rewritten in place, same size, new mtime: hashed again
    store(cache, key)
    hashed.clear()
    assert cache.lookup(key).hit and hashed == []
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    found = cache.lookup(key)
    assert len(hashed) == 1 and not found.hit and found.error.reason == "corrupt"


# ------------------------------------------------------------------------------------ roots, listing
def test_extra_roots_are_searched_but_not_written(tmp_path) -> None:
    shared = EngineCache(tmp_path / "shared")
    key = make_key()
    store(shared, key)
    cache = EngineCache(tmp_path / "mine", extra_roots=(tmp_path / "shared",))
    assert cache.lookup(key).hit and cache.lookup(key).record.path.is_relative_to(tmp_path / "shared")
    assert cache.engine_path(key).is_relative_to(tmp_path / "mine")


def test_entries_and_find(cache) -> None:
    weights = "tiny-sd-0123456789abcdef"
    static = make_key(weights=weights, shapes=EngineShapes.static(2, 512, 512))
    ranged = make_key(weights=weights, shapes=EngineShapes.ranged(2, 512, 512, 256, 768))
    other = make_key(weights="other-fedcba9876543210")
    for key in (static, ranged, other):
        store(cache, key)
    broken = store(cache, make_key(weights=weights, component="vae_decoder", shapes=EngineShapes.static(1, 512, 512)))
    corrupt(broken, "truncate")
    entries = cache.entries(weights)
    assert len(entries) == 3 and sum(e.record is None for e in entries) == 1
    found = cache.find(weights, "unet", rows=2, width=512, height=512)
    assert [r.key for r in found] == [static, ranged]  # exact static shapes first
    assert [r.key for r in cache.find(weights, "unet", rows=2, width=640, height=384)] == [ranged]
    assert cache.find(weights, "unet", rows=3, width=512, height=512) == []
    assert cache.find(weights, "unet", rows=2, width=512, height=512, target="SM86") == []
    assert cache.find(weights, "vae_decoder", rows=1, width=512, height=512) == []  # the damaged one
    # the family: the same weights name and shapes, but an SDXL engine is no SD1 stream's and the other way round
    xl = make_key(weights=weights, family="sdxl", shapes=EngineShapes.static(2, 512, 512))
    store(cache, xl)
    assert [r.key for r in cache.find(weights, "unet", rows=2, width=512, height=512, family="sd1")] == [static, ranged]
    assert [r.key for r in cache.find(weights, "unet", rows=2, width=512, height=512, family="sdxl")] == [xl]


def test_remove(cache) -> None:
    key = make_key()
    path = store(cache, key)
    assert cache.remove(key) and not path.exists() and not cache.meta_path(path).exists()
    assert not cache.remove(key)


# ------------------------------------------------------------------------------------------- weights
def _models(identity: dict, seed: int = 0) -> StreamModels:
    from streamrt.random_models import random_stream_models

    return random_stream_models("tiny", seed=seed, identity=identity)


def test_weights_fingerprint() -> None:
    files = [["/m/diffusers/tiny-sd/unet/w.safetensors", 10, 1], ["/m/diffusers/tiny-sd/vae/w.safetensors", 5, 1]]
    a = _models({"kind": "diffusers", "files": files, "dtype": "torch.float32", "device": "cpu"})
    fp = weights_fingerprint(a)
    assert fp.startswith("tiny-sd-") and len(fp.rsplit("-", 1)[1]) == 16
    a.identity.update(dtype="torch.float16", device="cuda:0")     # where they are loaded: same engines
    assert weights_fingerprint(a) == fp
    a.identity["loras"] = [["style.safetensors", 1.0]]            # a LoRA set changes the weights
    assert weights_fingerprint(a) != fp
    moved = [[f[0], f[1], 2] for f in files]                        # a rewritten file too
    assert weights_fingerprint(_models({"kind": "diffusers", "files": moved})) != fp


def test_anonymous_models_are_fingerprinted_by_their_weights() -> None:
    a, b = _models({}, seed=0), _models({}, seed=0)
    assert weights_fingerprint(a) == weights_fingerprint(b) and weights_fingerprint(a).startswith("unnamed-")
    with torch.no_grad():
        next(b.unet.parameters()).add_(1.0)
    b._streamrt_weights_fingerprint = None
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_find_respects_the_size_step_of_a_dynamic_engine(cache) -> None:
    key = make_key(shapes=EngineShapes.ranged(2, 512, 512, 256, 768))
    with cache.staging() as staging:
        (staging / "e").write_bytes(b"x" * 100)
        cache.commit(key, staging / "e", {"pixel_multiple": 64})
    assert cache.find(key.weights, "unet", rows=2, width=640, height=384)
    assert cache.find(key.weights, "unet", rows=2, width=600, height=384) == []  # 600 is not a multiple of 64


def _load(folder: Path, *loras: Path) -> StreamModels:
    from stream_helpers import quiet_load

    import streamrt

    if not loras:
        return quiet_load(folder)
    return streamrt.load_diffusers_folder(folder, dtype="fp32", device="cpu", loras=[str(p) for p in loras])


def test_weights_fingerprint_is_the_content_not_the_path(tiny_folders, tmp_path) -> None:
    import shutil

    from model_files import lora_state_dict
    from safetensors.torch import load_file, save_file

    for name in ("a", "b", "changed"):
        shutil.copytree(tiny_folders["tiny"], tmp_path / name / "tiny")
    (tmp_path / "linked").symlink_to(tmp_path / "a", target_is_directory=True)  # a symlinked models folder
    unet_file = tmp_path / "changed" / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet_file)
    name = sorted(weights)[0]
    weights[name].view(-1)[0] += 1.0                                            # one weight changed
    save_file(weights, unet_file)

    a, b, linked = (_load(tmp_path / n / "tiny") for n in ("a", "b", "linked"))
    assert a.identity["files"] != b.identity["files"]                           # other paths and mtimes
    assert weights_fingerprint(a) == weights_fingerprint(b) == weights_fingerprint(linked)
    assert weights_fingerprint(a).startswith("tiny-")
    assert weights_fingerprint(_load(tmp_path / "changed" / "tiny")) != weights_fingerprint(a)

    # LoRA files count by their content too (and their strengths still count)
    lora = lora_state_dict(a)
    for folder in ("l1", "l2"):
        (tmp_path / folder).mkdir()
        save_file(lora, tmp_path / folder / "style.safetensors")
    with_l1, with_l2 = _load(tmp_path / "a" / "tiny", tmp_path / "l1" / "style.safetensors"), _load(
        tmp_path / "b" / "tiny", tmp_path / "l2" / "style.safetensors")
    assert weights_fingerprint(with_l1) == weights_fingerprint(with_l2) != weights_fingerprint(a)
    save_file(lora_state_dict(a, seed=1), tmp_path / "l2" / "style.safetensors")
    assert weights_fingerprint(_load(tmp_path / "b" / "tiny", tmp_path / "l2" / "style.safetensors")) \
        != weights_fingerprint(with_l1)


def test_weight_files_are_hashed_once_per_process(tmp_path, monkeypatch) -> None:
    from streamrt import weights as weights_mod

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"0123456789" * 1000)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    digest = weights_mod.content_digest(path)
    assert weights_mod.content_digest(path) == digest and opened == [str(path)]
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    assert weights_mod.content_digest(link) == digest and len(opened) == 1     # the same file by another path
    path.write_bytes(b"9123456789" * 1000)                                      # rewritten: read again
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert weights_mod.content_digest(path) != digest and len(opened) == 2
