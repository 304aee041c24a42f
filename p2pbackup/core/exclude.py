"""Exclusion rules: which paths a backup leaves out (pure).

Nouns:

* **pattern** — a shell-style pattern (``*``, ``?``, ``[...]``). One without
  a slash matches any file or directory of that **name**, wherever it is
  (``*.tmp``, ``node_modules``, ``.cache``); one with a slash matches the
  whole absolute **path** (``/home/me/Downloads``, ``/home/*/tmp``). A
  directory that matches is left out with everything under it.
* **marker** — a file name (``CACHEDIR.TAG``, ``.nobackup``) whose presence
  in a directory leaves that directory out, with everything under it
  (restic's ``--exclude-if-present``).
* **one file system** — with it, an entry on another file system than the
  directory holding it (a mount point) is left out with everything under
  it; the paths a backup is given are always backed up.
* **rules** — :class:`ExcludeRules`, the patterns, markers and file system
  rule of one backup.
* **pattern file** — patterns, or a backup's paths, a line each; blank
  lines and lines starting with ``#`` are skipped (:func:`list_lines`).

Paths are bytes (names need not be UTF-8); patterns are text, encoded the
way the file system encodes names.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

import attrs

from p2pbackup.errors import UsageError


def _compile(pattern: str) -> re.Pattern[bytes]:
    # fnmatch's translation, applied to the pattern's bytes, so that a
    # pattern can match names that are not valid UTF-8 too.
    return re.compile(fnmatch.translate(pattern).encode("utf-8", "surrogateescape"), re.DOTALL)


def list_lines(text: str) -> list[str]:
    """The entries of a pattern file (module docstring), stripped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@attrs.frozen
class ExcludeRules:
    patterns: tuple[str, ...] = ()
    _names: tuple[re.Pattern[bytes], ...] = attrs.field(default=(), repr=False)
    _paths: tuple[re.Pattern[bytes], ...] = attrs.field(default=(), repr=False)
    #: Markers, encoded as file names are.
    markers: frozenset[bytes] = frozenset()
    one_file_system: bool = False

    @classmethod
    def from_patterns(
        cls,
        patterns: Iterable[str],
        *,
        if_present: Iterable[str] = (),
        one_file_system: bool = False,
    ) -> ExcludeRules:
        """The rules of ``patterns``, the markers ``if_present`` and the file
        system rule; :class:`UsageError` for an empty pattern or a marker
        that is not a plain name."""
        markers = set()
        for name in if_present:
            if not name or "/" in name or name in (".", ".."):
                raise UsageError(f"--exclude-if-present takes a file name, not {name!r}")
            markers.add(name.encode("utf-8", "surrogateescape"))
        kept = tuple(patterns)
        names, paths = [], []
        for pattern in kept:
            if not pattern.strip():
                raise UsageError("an exclude pattern may not be empty")
            stripped = pattern.rstrip("/") or "/"
            if "/" in stripped:
                paths.append(_compile(stripped))
            else:
                names.append(_compile(stripped))
        return cls(kept, tuple(names), tuple(paths), frozenset(markers), one_file_system)

    def excludes(self, path: bytes) -> bool:
        """Whether the absolute ``path`` is left out."""
        if not (self._names or self._paths):
            return False
        name = path.rsplit(b"/", 1)[-1]
        return any(p.match(name) for p in self._names) or any(p.match(path) for p in self._paths)

    def leaves_out(self, path: bytes, device: int, parent_device: int | None) -> bool:
        """Whether the entry at ``path``, on ``device``, is left out by a
        pattern or, in a directory on ``parent_device`` (None: one of the
        paths given, never left out so), by the file system rule."""
        if self.excludes(path):
            return True
        return self.one_file_system and parent_device is not None and device != parent_device

    def marked(self, names: Iterable[bytes]) -> bool:
        """Whether a directory holding ``names`` is left out by a marker."""
        return bool(self.markers) and any(name in self.markers for name in names)
