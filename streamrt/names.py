"""Names of model files and folders as users give them: resolved inside their registered folders, or refused.

A name comes from a widget, but any API client can send any string (ComfyUI does not check combo values of
V3 nodes), so ``../../somewhere`` or ``/etc`` must never reach the disk. A name is accepted only when it is
a plain relative name (no ``..``, no absolute path, drive letter, backslash or empty part) **and** it is one
of the names found by listing the registered folders. Listing walks the folders the way ComfyUI lists its
models, following the links a user placed inside them (a models folder on another drive is a link); a
name can therefore only reach what the folders' owner put there.

:class:`FolderIndex` caches a listing and refreshes it when a folder it walked changes (its modification
time) or a registered folder that was missing appears, the way ComfyUI refreshes its model lists
(``folder_paths.get_filename_list``), so listing for a node's schema, which ComfyUI asks for at every
validation, costs a few ``stat`` calls, not a walk of the user's whole model collection.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence


class NameRefused(ValueError):
    """A user-given name that does not resolve inside its registered folders; the message says why."""


_DRIVE = re.compile(r"^[A-Za-z]:")


def plain_relative_name(name: object, what: str = "name") -> str:
    """``name`` if it is a plain relative name (``a/b``), else :class:`NameRefused` saying what is wrong."""
    if not isinstance(name, str) or not name.strip():
        raise NameRefused(f"{what} {name!r} is not a name")
    reason = None
    if "\x00" in name:
        reason = "it contains a NUL character"
    elif "\\" in name:
        reason = "it contains a backslash (use '/' between folders)"
    elif name.startswith("/") or _DRIVE.match(name):
        reason = "it is an absolute path"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        reason = "it has an empty, '.' or '..' part"
    if reason:
        raise NameRefused(f"{what} {name!r} is refused: {reason}; use a name listed in its models folder")
    return name


class FolderIndex:
    """The sub-folders holding ``marker`` (e.g. ``model_index.json``) under a set of base folders.

    Names are ``/``-separated paths relative to their base. A folder holding the marker is a model: the walk
    does not descend into it. Link loops are walked once.
    """

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self._lock = threading.Lock()
        self._bases: tuple[str, ...] | None = None
        self._stamps: dict[str, int] = {}
        self._absent: tuple[str, ...] = ()  # bases that were not folders when listed
        self._paths: dict[str, str] = {}

    def names(self, bases: Sequence[str]) -> list[str]:
        """The sorted names under ``bases`` (re-listed only when a walked folder changed)."""
        with self._lock:
            self._refresh(tuple(bases))
            return sorted(self._paths)

    def resolve(self, bases: Sequence[str], name: str, what: str = "folder") -> str:
        """The path of a listed ``name``; :class:`NameRefused` for an unsafe name, FileNotFoundError for a
        plain name that is not (or no longer) there."""
        plain_relative_name(name, what)
        with self._lock:
            self._refresh(tuple(bases))
            path = self._paths.get(name)
            if path is None or not os.path.isfile(os.path.join(path, self.marker)):
                self._refresh(tuple(bases), force=True)
                path = self._paths.get(name)
        if path is None:
            raise FileNotFoundError(f"{what} {name!r} was not found (no {self.marker} in it)")
        return path

    def _refresh(self, bases: tuple[str, ...], force: bool = False) -> None:
        if not force and bases == self._bases and self._unchanged():
            return
        stamps: dict[str, int] = {}
        paths: dict[str, str] = {}
        for base in bases:
            self._walk(base, stamps, paths)
        self._bases, self._stamps, self._paths = bases, stamps, paths
        self._absent = tuple(base for base in bases if base not in stamps)

    def _unchanged(self) -> bool:
        """No walked folder changed and no base folder appeared (the checks ComfyUI's own model lists make)."""
        try:
            if not all(os.stat(folder).st_mtime_ns == stamp for folder, stamp in self._stamps.items()):
                return False
        except OSError:
            return False
        return not any(os.path.isdir(base) for base in self._absent)

    def _walk(self, base: str, stamps: dict[str, int], paths: dict[str, str]) -> None:
        seen: set[str] = set()
        for root, dirs, files in os.walk(base, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:  # a link back up: walked already
                dirs[:] = []
                continue
            seen.add(real)
            try:
                stamps[root] = os.stat(root).st_mtime_ns
            except OSError:
                continue
            if self.marker in files and root != base:
                paths.setdefault(os.path.relpath(root, base).replace(os.sep, "/"), root)
                dirs[:] = []  # a model folder: its sub-folders are its parts, not more models
            else:
                dirs.sort()
