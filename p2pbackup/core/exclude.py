"""Exclusion rules: which paths a backup leaves out (pure).

Nouns:

* **pattern** — a shell-style pattern (``*``, ``?``, ``[...]``). One without
  a slash matches any file or directory of that **name**, wherever it is
  (``*.tmp``, ``node_modules``, ``.cache``); one with a slash matches the
  whole absolute **path** (``/home/me/Downloads``, ``/home/*/tmp``). A
  directory that matches is left out with everything under it.
* **rules** — :class:`ExcludeRules`, the patterns of one backup.

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


@attrs.frozen
class ExcludeRules:
    patterns: tuple[str, ...] = ()
    _names: tuple[re.Pattern[bytes], ...] = attrs.field(default=(), repr=False)
    _paths: tuple[re.Pattern[bytes], ...] = attrs.field(default=(), repr=False)

    @classmethod
    def from_patterns(cls, patterns: Iterable[str]) -> ExcludeRules:
        """The rules of ``patterns``; :class:`UsageError` for an empty one."""
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
        return cls(kept, tuple(names), tuple(paths))

    def excludes(self, path: bytes) -> bool:
        """Whether the absolute ``path`` is left out."""
        if not (self._names or self._paths):
            return False
        name = path.rsplit(b"/", 1)[-1]
        return any(p.match(name) for p in self._names) or any(p.match(path) for p in self._paths)
