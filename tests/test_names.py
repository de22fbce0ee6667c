"""User-given model names resolve inside their registered folders or are refused by name (streamrt.names).

On main d5c3959 the nodes joined the user's name onto the models folder, so ``../../x`` or an absolute path
loaded a diffusers or TAESD folder from anywhere on disk (tests/test_hardening_e2e.py shows it on the real
server); here the resolution itself is checked, on plain folders.
"""

from __future__ import annotations

import os

import pytest

from streamrt import names
from streamrt.names import FolderIndex, NameRefused, plain_relative_name

MARKER = "model_index.json"


def make_model(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("{}")
    (folder / "unet").mkdir(exist_ok=True)
    (folder / "unet" / MARKER).write_text("{}")  # a marker inside a model is a part, not another model


@pytest.mark.parametrize("name,why", [
    ("../outside", "'..'"), ("a/../../outside", "'..'"), ("/etc", "absolute"), ("C:/models/x", "absolute"),
    ("a\\..\\b", "backslash"), ("", "not a name"), ("a//b", "empty"), ("./a", "'.'"), ("a\x00b", "NUL"),
])
def test_unsafe_names_are_refused_by_name(name, why):
    with pytest.raises(NameRefused, match=why):
        plain_relative_name(name, "diffusers model")


def test_listing_and_resolving_stay_inside_the_folders(tmp_path):
    base, outside = tmp_path / "models" / "diffusers", tmp_path / "elsewhere"
    make_model(base / "sd-turbo")
    make_model(base / "team" / "sd15")
    make_model(outside / "secret")
    index = FolderIndex(MARKER)
    bases = [str(base)]
    assert index.names(bases) == ["sd-turbo", "team/sd15"]  # nested, and not the model's own parts
    assert index.resolve(bases, "team/sd15") == str(base / "team" / "sd15")
    # an existing model outside the folder, reached by '..' or by its absolute path: refused by name
    with pytest.raises(NameRefused, match="'..'"):
        index.resolve(bases, "../../elsewhere/secret")
    with pytest.raises(NameRefused, match="absolute"):
        index.resolve(bases, str(outside / "secret"))
    with pytest.raises(FileNotFoundError, match="'nope' was not found"):
        index.resolve(bases, "nope")
    with pytest.raises(FileNotFoundError):
        index.resolve(bases, "sd-turbo/unet")  # a part of a model is not a model


def test_links_the_owner_put_inside_are_followed_once(tmp_path):
    """Decision: a link placed inside the models folder (a collection on another drive) is part of the
    folder, as ComfyUI lists it; a link loop is walked once, not forever."""
    base, drive = tmp_path / "diffusers", tmp_path / "drive"
    make_model(drive / "big-model")
    base.mkdir()
    (base / "drive").symlink_to(drive, target_is_directory=True)
    (drive / "loop").symlink_to(base, target_is_directory=True)
    index = FolderIndex(MARKER)
    assert index.names([str(base)]) == ["drive/big-model"]
    assert os.path.realpath(index.resolve([str(base)], "drive/big-model")) == str(drive / "big-model")


def test_listing_is_cached_until_a_folder_changes(tmp_path, monkeypatch):
    base = tmp_path / "diffusers"
    make_model(base / "a")
    walks = []
    real_walk = os.walk
    monkeypatch.setattr(names.os, "walk", lambda *a, **k: walks.append(a[0]) or real_walk(*a, **k))
    index = FolderIndex(MARKER)
    assert index.names([str(base)]) == ["a"]
    for _ in range(5):
        assert index.names([str(base)]) == ["a"]
    assert len(walks) == 1  # five more schema listings: no walk, only stats
    make_model(base / "b")   # a new model changes the base folder's mtime
    os.utime(base, ns=(os.stat(base).st_atime_ns, os.stat(base).st_mtime_ns + 1_000_000))
    assert index.names([str(base)]) == ["a", "b"] and len(walks) == 2
    # a model that appeared without a visible folder change (mtime put back) is not listed yet, but it is
    # found when asked for by name
    before = os.stat(base)
    make_model(base / "c")
    os.utime(base, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert index.names([str(base)]) == ["a", "b"]
    assert index.resolve([str(base)], "c") == str(base / "c") and index.names([str(base)]) == ["a", "b", "c"]


def test_a_registered_folder_that_appears_later_is_listed(tmp_path, monkeypatch):
    """As ComfyUI's own lists notice a model folder created after they were listed (folder_paths checks that
    every registered folder that exists was walked): the next listing walks it, and only then."""
    present, later = tmp_path / "models" / "diffusers", tmp_path / "elsewhere" / "diffusers"
    make_model(present / "a")
    walks = []
    real_walk = os.walk
    monkeypatch.setattr(names.os, "walk", lambda *a, **k: walks.append(a[0]) or real_walk(*a, **k))
    index = FolderIndex(MARKER)
    bases = [str(present), str(later)]
    assert index.names(bases) == ["a"] and len(walks) == 2
    assert index.names(bases) == ["a"] and len(walks) == 2  # the missing folder is checked, not walked
    make_model(later / "b")
    assert index.names(bases) == ["a", "b"] and len(walks) == 4
    assert index.names(bases) == ["a", "b"] and len(walks) == 4
