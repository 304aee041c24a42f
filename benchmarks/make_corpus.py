"""A synthetic home directory for the benchmarks: the same tree for the same seed.

Usage (standard library only, Python 3.11 or later)::

    python3 benchmarks/make_corpus.py OUT --size-mb 1024 --seed 1   # a new corpus in OUT
    python3 benchmarks/make_corpus.py OUT --mutate 2 --seed 1       # edit OUT in place
    python3 benchmarks/make_corpus.py OUT --describe                # what a tree holds

Nouns:

* **corpus** — the tree written into OUT (which must be missing or empty):
  exactly ``--size-mb`` MiB of regular files, in directories named like a
  home directory's, nested up to :data:`MAX_DEPTH` deep.
* **size class** — what a file is, which fixes its share of the bytes and
  the range of its size (log-uniform within the range):

  - **media**, 60 %: 5–50 MiB incompressible files (raw photos, videos,
    disk images, archives);
  - **document**, 25 %: 100 KiB–2 MiB, half text (notes, csv, logs, html),
    half incompressible (jpeg, mp3, pdf, zip);
  - **small**, the rest: 200 B–16 KiB, mostly source and configuration
    text, some small binaries (object files, icons, caches).

  A class whose remaining budget is less than its smallest file hands it to
  the next class; the last small file takes whatever is left.
* **area** — where files of a class go: a folder under OUT, the extensions
  met there, a weight among the class's areas and how many files a
  directory holds on average (3 for media, 8 for documents, 18–25 for small
  files). Areas under the same folder share its directories.
* **copy** — a file with the bytes of an earlier file of its class, put in
  another directory (the same photo in two albums): about one file in
  twenty. The first media file is at most half of the media budget, so that
  a corpus with room for two media files has a media copy.
* **empties** — two empty files and two empty directories.
* **stream** — the bytes of an incompressible file: SHAKE-128 of the seed,
  the file's number and the block, so no two files and no two blocks share
  a byte string.
* **text** — lines drawn from five pools (prose, source, records, settings,
  markup) built from a made-up vocabulary with Zipf-distributed word
  frequencies: it compresses about as real text does, and no two files
  share a chunk.
* **mutation** — ``--mutate P`` edits P % of the regular files (at least
  one, plus two media files where there are any): media files get bytes
  inserted in the middle or appended, others an append, an insert, an
  overwrite in place or a truncation. It also adds a few files (one of them
  media) and deletes a few it did not edit. Its draws depend on ``--seed``,
  P and a digest of the tree's listing, so mutating twice makes two
  different edits, each repeatable.

Determinism: every choice comes from ``random.Random.random()`` seeded with
a string, the one part of :mod:`random` that Python promises to keep across
versions, and every incompressible byte from SHAKE-128: the same arguments
give the same tree, byte for byte (tested on CPython 3.11). Modification
times are those of the writing (backup tools need real ones).

Each run prints one line of ``key=value`` words; the benchmarks read
``new_bytes=`` of a mutation and everything before `` seed=`` as its summary.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import itertools
import math
import os
import random
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

KiB = 1 << 10
MiB = 1 << 20

#: Deepest directory below OUT (``src/proj/pkg/sub/mod`` is 5).
MAX_DEPTH = 5
#: Share of a class's files that are copies of an earlier one.
COPY_CHANCE = 0.05
#: Incompressible bytes are produced and written in blocks of this size.
STREAM_BLOCK = 4 * MiB
#: A file at least this large counts as media when a tree is described or
#: mutated (the classes' ranges leave a gap around it).
MEDIA_AT_LEAST = 4 * MiB
#: A file smaller than this counts as small.
SMALL_BELOW = 64 * KiB

T = TypeVar("T")

#: Extensions whose files are text; every other file is a stream.
TEXT_EXTENSIONS = frozenset((
    ".c", ".cfg", ".conf", ".css", ".csv", ".go", ".h", ".html", ".ini", ".java", ".js", ".json",
    ".log", ".md", ".py", ".rs", ".rst", ".sh", ".svg", ".tex", ".toml", ".ts", ".txt", ".xml",
    ".yaml", ".yml",
))  # fmt: skip


# -- draws ---------------------------------------------------------------------------


class Draws:
    """Every choice of one purpose, from one seeded ``random()`` stream."""

    def __init__(self, *purpose: object) -> None:
        self._unit = random.Random(":".join(map(str, purpose))).random

    def unit(self) -> float:
        return self._unit()

    def chance(self, probability: float) -> bool:
        return self._unit() < probability

    def below(self, count: int) -> int:
        return int(self._unit() * count)

    def between(self, low: int, high: int) -> int:
        """An integer from ``low`` to ``high``, both included."""
        return low + self.below(high - low + 1)

    def log_uniform(self, low: int, high: int) -> int:
        factor: float = (high / low) ** self._unit()
        return round(low * factor)

    def pick(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def picks(self, items: Sequence[T], count: int) -> list[T]:
        unit, size = self._unit, len(items)
        return [items[int(unit() * size)] for _ in range(count)]

    def weighted(self, items: Sequence[T], cumulative: Sequence[float]) -> T:
        return items[bisect.bisect(cumulative, self._unit() * cumulative[-1])]

    def sample(self, items: Sequence[T], count: int) -> list[T]:
        """``count`` distinct items (all of them if there are fewer)."""
        pool = list(items)
        count = min(count, len(pool))
        for i in range(count):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:count]


def stream_blocks(key: str, size: int) -> Iterator[bytes]:
    """The stream of ``size`` bytes named ``key``, block by block."""
    for index in range(-(-size // STREAM_BLOCK)):
        length = min(STREAM_BLOCK, size - index * STREAM_BLOCK)
        yield hashlib.shake_128(f"{key}/{index}".encode()).digest(length)


def stream_bytes(key: str, size: int) -> bytes:
    return b"".join(stream_blocks(key, size))


# -- text ----------------------------------------------------------------------------

_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v",
           "w", "y", "z", "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "kr", "ph",
           "pl", "pr", "sc", "sh", "sk", "sl", "sm", "sn", "sp", "st", "sw", "th", "tr", "wh",
           "wr")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "y", "a", "e", "i", "o", "ai", "au", "ea", "ee", "ie", "io",
           "oa", "oo", "ou", "ue")  # fmt: skip
_CODAS = ("", "", "", "", "b", "d", "ck", "ft", "g", "l", "ld", "lt", "m", "mp", "n", "nd",
          "ng", "nt", "p", "r", "rd", "rk", "rn", "rt", "s", "sh", "sk", "st", "t", "th",
          "x")  # fmt: skip


class Text:
    """Pools of made-up lines, and files cut from them.

    Words are one to four syllables; their frequencies follow Zipf's law, as
    a language's do. A file's text is lines picked at random from the pool
    its extension selects, so it repeats words and idioms, not whole runs of
    lines.
    """

    #: Distinct words, the exponent of their Zipf law, how many of the commonest
    #: serve as identifiers in code, and lines per pool: together they set how
    #: well text compresses.
    VOCABULARY = 8000
    ZIPF_EXPONENT = 0.9
    NAMES = 1000
    POOL_LINES = 40_000
    #: Entries of the grid that words are picked from by frequency.
    GRID = 1 << 18

    def __init__(self, seed: int) -> None:
        draws = Draws("text", seed)
        words: set[str] = set()
        while len(words) < self.VOCABULARY:
            syllables = 1 + min(3, int(abs(draws.unit() - draws.unit()) * 5))
            words.add(
                "".join(
                    (draws.pick(_ONSETS) if draws.chance(0.8) else "")
                    + draws.pick(_VOWELS)
                    + draws.pick(_CODAS)
                    for _ in range(syllables)
                )
            )
        self.words = sorted(words)
        self._ranked = draws.sample(self.words, len(self.words))
        self._frequent = self._zipf_grid()
        self._draws = draws
        self.pools = {
            "prose": self._pool(self._prose_line),
            "source": self._pool(self._source_line),
            "records": self._pool(self._record_line),
            "settings": self._pool(self._setting_line),
            "markup": self._pool(self._markup_line),
        }

    # the pools

    def _zipf_grid(self) -> list[str]:
        """The ranked words, each repeated in proportion to its frequency.

        A uniform pick from the grid is a pick by Zipf's law at the cost of
        one draw; the grid is fine enough that the rarest word still appears.
        """
        weights = [1 / (rank + 1) ** self.ZIPF_EXPONENT for rank in range(len(self._ranked))]
        scale = self.GRID / sum(weights)
        grid: list[str] = []
        total = 0.0
        for word, weight in zip(self._ranked, weights, strict=True):
            total += weight * scale
            grid.extend([word] * max(1, round(total) - len(grid)))
        return grid

    def _pool(self, line: Callable[[], str]) -> list[str]:
        return [line() for _ in range(self.POOL_LINES)]

    def _word(self) -> str:
        return self._draws.pick(self._frequent)

    def _name(self) -> str:
        # Identifiers come from the commoner words, as they do in code.
        return self._ranked[self._draws.below(self.NAMES)]

    def _phrase(self, low: int, high: int) -> str:
        return " ".join(self._draws.picks(self._frequent, self._draws.between(low, high)))

    def _prose_line(self) -> str:
        sentence = self._phrase(4, 16)
        if self._draws.chance(0.3):
            sentence += ", " + self._phrase(2, 8)
        return sentence[0].upper() + sentence[1:] + self._draws.pick(".....?!:")

    def _source_line(self) -> str:
        d, n = self._draws, self._name
        indent = "    " * d.pick((0, 1, 1, 1, 2, 2, 3))
        templates: tuple[Callable[[], str], ...] = (
            lambda: f"def {n()}_{n()}({n()}, {n()}={d.below(100)}):",
            lambda: f"{indent}{n()} = {n()}.{n()}({n()}, {d.below(4096)})",
            lambda: f"{indent}if {n()} is not None and len({n()}) > {d.below(64)}:",
            lambda: f"{indent}for {n()} in {n()}.{n()}():",
            lambda: f"{indent}return {n()}_{n()}({n()})",
            lambda: f"{indent}# {self._phrase(3, 10)}",
            lambda: f"from {n()}.{n()} import {n()}, {n()}",
            lambda: f"class {n().title()}{n().title()}({n().title()}):",
            lambda: f'{indent}raise {n().title()}Error("{self._phrase(2, 7)}")',
            lambda: "",
            lambda: f"static int {n()}_{n()}(const struct {n()} *{n()}, size_t {n()})",
            lambda: f"{indent}{n()}->{n()}[{d.below(256)}] = {n()}({n()}, &{n()});",
            lambda: f"{indent}}}",
            lambda: f"#include <{n()}/{n()}.h>",
            lambda: f"{indent}const {n()} = await {n()}.{n()}({n()}, {{ {n()}: {d.below(10)} }});",
            lambda: f"export function {n()}{n().title()}({n()}) {{",
        )
        return d.pick(templates)()

    def _record_line(self) -> str:
        d = self._draws
        if d.chance(0.5):
            return (
                f"{2018 + d.below(8)}-{1 + d.below(12):02d}-{1 + d.below(28):02d}T"
                f"{d.below(24):02d}:{d.below(60):02d}:{d.below(60):02d}.{d.below(1000):03d}Z "
                f"{d.pick(('INFO', 'INFO', 'INFO', 'DEBUG', 'WARN', 'ERROR'))} [{self._name()}] "
                f"{self._phrase(3, 9)} {self._name()}={d.below(1_000_000)}"
            )
        return (
            f"{d.below(10_000_000)},{self._word()},{self._word()},"
            f"{d.unit() * 10_000:.2f},{d.below(100)},{self._phrase(1, 5)}"
        )

    def _setting_line(self) -> str:
        d, n = self._draws, self._name
        templates: tuple[Callable[[], str], ...] = (
            lambda: f"[{n()}.{n()}]",
            lambda: f"{n()}_{n()} = {d.below(10_000)}",
            lambda: f'{n()} = "{self._phrase(1, 4)}"',
            lambda: f"  {n()}: {d.pick(('true', 'false', 'null', n()))}",
            lambda: f'    "{n()}": "{n()}/{n()}",',
            lambda: f"{n()}.{n()}.{n()}={d.unit():.4f}",
        )
        return d.pick(templates)()

    def _markup_line(self) -> str:
        n = self._name
        tag = self._draws.pick(("p", "div", "span", "li", "td", "a", "path", "entry"))
        return f'<{tag} class="{n()}-{n()}">{self._phrase(2, 12)}</{tag}>'

    # files

    def pool_for(self, extension: str) -> list[str]:
        if extension in {".log", ".csv"}:
            return self.pools["records"]
        if extension in {".cfg", ".conf", ".ini", ".json", ".toml", ".yaml", ".yml"}:
            return self.pools["settings"]
        if extension in {".html", ".svg", ".xml"}:
            return self.pools["markup"]
        if extension in {".md", ".rst", ".tex", ".txt"}:
            return self.pools["prose"]
        return self.pools["source"]

    def make(self, draws: Draws, extension: str, size: int) -> bytes:
        """``size`` bytes of text for a file with ``extension``."""
        pool = self.pool_for(extension)
        parts: list[bytes] = []
        have = 0
        while have < size:
            piece = ("\n".join(draws.picks(pool, size // 40 + 2)) + "\n").encode()
            parts.append(piece)
            have += len(piece)
        return b"".join(parts)[:size]


def write_file(path: Path, data: bytes | Iterator[bytes]) -> None:
    with path.open("xb") as out:
        if isinstance(data, bytes):
            out.write(data)
        else:
            for block in data:
                out.write(block)


# -- layout --------------------------------------------------------------------------


@dataclass(frozen=True)
class Area:
    folder: tuple[str, ...]
    extensions: tuple[str, ...]
    weight: int
    files_per_dir: int


@dataclass(frozen=True)
class SizeClass:
    name: str
    share: float
    low: int
    high: int
    areas: tuple[Area, ...]

    def mean_size(self) -> float:
        """The mean of the log-uniform distribution of sizes."""
        return (self.high - self.low) / math.log(self.high / self.low)


def _areas(*rows: tuple[str, str, int, int]) -> tuple[Area, ...]:
    return tuple(
        Area(tuple(folder.split("/")), tuple(exts.split()), weight, per_dir)
        for folder, exts, weight, per_dir in rows
    )


CLASSES = (
    SizeClass(
        "media", 0.60, 5 * MiB, 50 * MiB,
        _areas(
            ("Pictures", ".CR2 .NEF .DNG .tif", 4, 3),
            ("Videos", ".mp4 .mov .mkv", 4, 3),
            ("Downloads", ".iso .zip .tar.gz .dmg", 2, 3),
            ("Backups", ".img .tar.zst .7z", 1, 3),
        ),
    ),
    SizeClass(
        "document", 0.25, 100 * KiB, 2 * MiB,
        _areas(
            ("Documents", ".txt .md .html .tex .csv", 3, 8),
            ("Projects/datasets", ".csv .json .log .xml", 3, 8),
            (".local/share", ".log .json .txt", 1, 8),
            ("Pictures", ".jpg .png .heic", 3, 8),
            ("Music", ".mp3 .ogg .flac", 2, 8),
            ("Documents", ".pdf .docx .xlsx .odt", 1, 8),
            ("Downloads", ".zip .pdf .deb", 1, 8),
        ),
    ),
    SizeClass(
        "small", 0.15, 200, 16 * KiB,
        _areas(
            ("src", ".py .c .h .js .go .rs .md .json .yaml .sh .toml", 12, 18),
            ("Projects", ".py .ts .java .md .toml .html .css", 6, 18),
            (".config", ".conf .ini .json .yaml .toml .cfg", 2, 18),
            ("Documents/notes", ".md .txt .rst", 2, 18),
            (".cache", ".bin .dat .idx", 2, 25),
            ("src", ".pyc .o .png .ico", 1, 25),
            ("Pictures/.thumbnails", ".png .jpg", 1, 25),
        ),
    ),
)  # fmt: skip


class Folders:
    """The directories of the corpus, grown under each area's folder."""

    def __init__(self, draws: Draws, words: Sequence[str]) -> None:
        self._draws = draws
        self._words = words
        self._trees: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        self.made: set[tuple[str, ...]] = set()

    def grow(self, folder: tuple[str, ...], count: int) -> None:
        """Add about ``count`` directories under ``folder``, each below a random
        one of those it has (so that trees grow bushy near the top)."""
        tree = self._trees.setdefault(folder, [folder])
        taken = set(tree)
        wanted = len(tree) + count
        for _ in range(20 * count):
            parents = [d for d in tree if len(d) < MAX_DEPTH]
            if len(tree) >= wanted or not parents:
                break
            parent = self._draws.pick(parents)
            child = (*parent, self._dir_name(parent))
            if child not in taken:
                taken.add(child)
                tree.append(child)

    def pick(self, folder: tuple[str, ...]) -> tuple[str, ...]:
        return self._draws.pick(self._trees[folder])

    def _dir_name(self, parent: tuple[str, ...]) -> str:
        d, w = self._draws, self._words
        top, depth = parent[0], len(parent)
        if top in ("Pictures", "Videos") and depth == 1:
            return str(2008 + d.below(18))
        if top in ("Pictures", "Videos") and depth == 2:
            return f"{1 + d.below(12):02d} {d.pick(w)}"
        if top == "Music" and depth == 1:
            return f"{d.pick(w).title()} {d.pick(w).title()}"
        if top in ("src", "Projects") and depth == 1:
            return f"{d.pick(w)}-{d.pick(w)}"
        if top == ".cache" and depth >= 2:
            return f"{d.below(256):02x}"
        return d.pick(w) if d.chance(0.7) else f"{d.pick(w)}_{d.pick(w)}"


def _file_stem(draws: Draws, words: Sequence[str], folder: str, extension: str) -> str:
    if extension in (".CR2", ".NEF", ".DNG", ".jpg", ".heic") and folder == "Pictures":
        return f"{draws.pick(('IMG_', 'DSC0', 'P'))}{draws.below(10_000):04d}"
    if folder == "Videos":
        return f"VID_{2008 + draws.below(18)}{1 + draws.below(12):02d}{1 + draws.below(28):02d}"
    if folder == "Music":
        return f"{1 + draws.below(20):02d} {draws.pick(words).title()} {draws.pick(words)}"
    if draws.chance(0.3):
        return f"{draws.pick(words)}_{draws.below(10_000):04d}"
    return f"{draws.pick(words)}_{draws.pick(words)}"


# -- generation ----------------------------------------------------------------------


@dataclass
class Tally:
    """What a generation wrote: files and bytes per size class, and the rest."""

    files: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    copies: int = 0
    copy_bytes: int = 0
    dirs: int = 0
    empty_files: int = 0
    empty_dirs: int = 0

    def add(self, size_class: str, size: int) -> None:
        self.files[size_class] = self.files.get(size_class, 0) + 1
        self.bytes[size_class] = self.bytes.get(size_class, 0) + size

    def line(self) -> str:
        per_class = " ".join(
            f"{c.name}={self.files.get(c.name, 0)}/{self.bytes.get(c.name, 0)}" for c in CLASSES
        )
        return (
            f"files={sum(self.files.values()) + self.empty_files} dirs={self.dirs} "
            f"bytes={sum(self.bytes.values())} {per_class} copies={self.copies} "
            f"copy_bytes={self.copy_bytes} empty_files={self.empty_files} "
            f"empty_dirs={self.empty_dirs}"
        )


class Generator:
    """One corpus being written: its draws, text, folders and paths so far."""

    def __init__(self, out: Path, size_mb: float, seed: int) -> None:
        self.out = out
        self.seed = seed
        self.total = int(size_mb * MiB)
        self.draws = Draws("corpus", seed)
        self.text = Text(seed)
        self.words = self.text.words
        self.folders = Folders(self.draws, self.words)
        self.paths: set[tuple[str, ...]] = set()
        self.tally = Tally()
        self._numbers = itertools.count()

    def run(self) -> Tally:
        budgets = [int(self.total * c.share) for c in CLASSES[:-1]]
        budgets.append(self.total - sum(budgets))
        for size_class, budget in zip(CLASSES, budgets, strict=True):
            self._plan_folders(size_class, budget)
        carry = 0
        for size_class, budget in zip(CLASSES, budgets, strict=True):
            carry = self._fill(size_class, budget + carry, last=size_class is CLASSES[-1])
        self._empties()
        self.tally.dirs = len(self.folders.made)
        return self.tally

    def _plan_folders(self, size_class: SizeClass, budget: int) -> None:
        files = budget / size_class.mean_size()
        weights = sum(a.weight for a in size_class.areas)
        for area in size_class.areas:
            share = files * area.weight / weights
            self.folders.grow(area.folder, max(1, round(share / area.files_per_dir)))

    def _choose(
        self, size_class: SizeClass, avoid: tuple[str, ...] | None = None
    ) -> tuple[tuple[str, ...], str]:
        cumulative = list(itertools.accumulate(a.weight for a in size_class.areas))
        for _ in range(20):
            area = self.draws.weighted(size_class.areas, cumulative)
            directory = self.folders.pick(area.folder)
            if directory != avoid:
                break
        return directory, self.draws.pick(area.extensions)

    def _new_path(self, directory: tuple[str, ...], extension: str) -> tuple[str, ...]:
        while True:
            path = (
                *directory,
                _file_stem(self.draws, self.words, directory[0], extension) + extension,
            )
            if path not in self.paths:
                self.paths.add(path)
                return path

    def _local(self, path: tuple[str, ...]) -> Path:
        return self.out.joinpath(*path)

    def _mkdir(self, directory: tuple[str, ...]) -> None:
        if directory not in self.folders.made:
            self._local(directory).mkdir(parents=True, exist_ok=True)
            self.folders.made.update(directory[:depth] for depth in range(1, len(directory) + 1))

    def _fill(self, size_class: SizeClass, budget: int, *, last: bool) -> int:
        """Write ``size_class``'s files; the budget it leaves to the next class."""
        media = size_class.name == "media"
        originals: list[tuple[tuple[str, ...], int]] = []
        left = budget
        while left > 0:
            owes_copy = media and self.tally.copies == 0
            if originals and (owes_copy or self.draws.chance(COPY_CHANCE)):
                fits = [o for o in originals if o[1] <= left]
                if fits:
                    left -= self._copy(size_class, self.draws.pick(fits))
                    continue
            size = self.draws.log_uniform(size_class.low, size_class.high)
            if media and not originals and left >= 2 * size_class.low:
                size = min(size, left // 2)  # room for its copy
            if size > left:
                if left < size_class.low and not last:
                    return left
                size = left
            directory, extension = self._choose(size_class)
            path = self._new_path(directory, extension)
            self._write(path, extension, size)
            originals.append((path, size))
            self.tally.add(size_class.name, size)
            left -= size
        return 0

    def _write(self, path: tuple[str, ...], extension: str, size: int) -> None:
        self._mkdir(path[:-1])
        number = next(self._numbers)
        if extension in TEXT_EXTENSIONS:
            write_file(self._local(path), self.text.make(self.draws, extension, size))
        else:
            write_file(self._local(path), stream_blocks(f"{self.seed}:{number}", size))

    def _copy(self, size_class: SizeClass, original: tuple[tuple[str, ...], int]) -> int:
        source, size = original
        directory, _ = self._choose(size_class, avoid=source[:-1])
        extension = _extension(source[-1])
        path = self._new_path(directory, extension)
        self._mkdir(directory)
        shutil.copyfile(self._local(source), self._local(path))
        self.tally.add(size_class.name, size)
        self.tally.copies += 1
        self.tally.copy_bytes += size
        return size

    def _empties(self) -> None:
        made = sorted(self.folders.made)
        package = next((d for d in made if d[0] == "src" and len(d) >= 3), ("src",))
        for path in ((*package, "__init__.py"), (".config", "lock")):
            self._mkdir(path[:-1])
            self.paths.add(path)
            write_file(self._local(path), b"")
            self.tally.empty_files += 1
        project = next((d for d in made if d[0] == "src" and len(d) == 2), ("src",))
        for directory in (("Downloads", "New folder"), (*project, "build", "tmp")):
            self._mkdir(directory)
            self.tally.empty_dirs += 1


def _extension(name: str) -> str:
    for double in (".tar.gz", ".tar.zst"):
        if name.endswith(double):
            return double
    return os.path.splitext(name)[1]


def generate(out: Path, size_mb: float, seed: int) -> Tally:
    """Write the corpus of ``size_mb`` MiB and ``seed`` into ``out`` (missing or empty)."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"make_corpus: {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    return Generator(out, size_mb, seed).run()


# -- describing a tree ---------------------------------------------------------------


def size_class_of(size: int) -> str:
    if size >= MEDIA_AT_LEAST:
        return "media"
    return "small" if size < SMALL_BELOW else "document"


def listing(root: Path) -> list[tuple[str, int]]:
    """(path relative to ``root``, size) of every regular file, sorted."""
    files = []
    for directory, dirs, names in os.walk(root):
        dirs.sort()
        for name in names:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                files.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return sorted(files)


@dataclass
class Description:
    """What a tree holds, in the terms of this module's nouns."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    depth: int = 0
    empty_files: int = 0
    empty_dirs: int = 0
    #: Files and bytes per size class (by size: see :func:`size_class_of`).
    class_files: dict[str, int] = field(default_factory=dict)
    class_bytes: dict[str, int] = field(default_factory=dict)
    #: Files whose bytes an earlier file (in path order) already has; empty
    #: files do not count.
    copies: int = 0
    copy_bytes: int = 0
    text_files: int = 0
    text_bytes: int = 0
    #: Bytes after compressing every file alone (zlib level 6; zstd level 3
    #: when the ``zstandard`` package is importable, else None).
    zlib_bytes: int = 0
    zlib_text_bytes: int = 0
    zstd_bytes: int | None = None
    zstd_text_bytes: int | None = None

    def lines(self) -> list[str]:
        def saved(packed: int | None, whole: int) -> str:
            return "n/a" if packed is None else f"{100 * (1 - packed / max(whole, 1)):.1f}%"

        per_class = " ".join(
            f"{name}={self.class_files.get(name, 0)}/{self.class_bytes.get(name, 0)}"
            for name in (c.name for c in CLASSES)
        )
        return [
            f"files={self.files} dirs={self.dirs} bytes={self.bytes} depth={self.depth} "
            f"empty_files={self.empty_files} empty_dirs={self.empty_dirs}",
            f"classes (files/bytes): {per_class}",
            f"copies={self.copies} ({100 * self.copies / max(self.files, 1):.1f}% of files) "
            f"copy_bytes={self.copy_bytes} ({100 * self.copy_bytes / max(self.bytes, 1):.1f}%)",
            f"text: files={self.text_files} bytes={self.text_bytes}",
            f"saved, all: zlib-6 {saved(self.zlib_bytes, self.bytes)}, "
            f"zstd-3 {saved(self.zstd_bytes, self.bytes)}; "
            f"text: zlib-6 {saved(self.zlib_text_bytes, self.text_bytes)}, "
            f"zstd-3 {saved(self.zstd_text_bytes, self.text_bytes)}",
        ]


def describe(root: Path) -> Description:
    """Read every file under ``root`` (any tree, not only a corpus) and say what it holds."""
    try:
        import zstandard
    except ImportError:
        zstd = None
    else:
        zstd = zstandard.ZstdCompressor(level=3)
    found = Description(zstd_bytes=0 if zstd else None, zstd_text_bytes=0 if zstd else None)
    seen: set[bytes] = set()
    for directory, dirs, names in os.walk(root):
        depth = len(Path(directory).relative_to(root).parts)
        found.depth = max(found.depth, depth)
        found.dirs += len(dirs)
        found.empty_dirs += not dirs and not names and depth > 0
    for relative, size in listing(root):
        data = (root / relative).read_bytes()
        found.files += 1
        found.bytes += size
        name = size_class_of(size)
        found.class_files[name] = found.class_files.get(name, 0) + 1
        found.class_bytes[name] = found.class_bytes.get(name, 0) + size
        if not size:
            found.empty_files += 1
            continue
        digest = hashlib.sha256(data).digest()
        if digest in seen:
            found.copies += 1
            found.copy_bytes += size
        seen.add(digest)
        is_text = _extension(relative) in TEXT_EXTENSIONS
        packed = len(zlib.compress(data, 6))
        found.zlib_bytes += packed
        if is_text:
            found.text_files += 1
            found.text_bytes += size
            found.zlib_text_bytes += packed
        if zstd is not None and found.zstd_bytes is not None and found.zstd_text_bytes is not None:
            packed = len(zstd.compress(data))
            found.zstd_bytes += packed
            if is_text:
                found.zstd_text_bytes += packed
    return found


# -- mutation ------------------------------------------------------------------------

#: How files that are not media are edited, with weights.
EDITS = ("append", "insert", "overwrite", "truncate")
EDIT_WEIGHTS = (40, 25, 15, 20)


@dataclass
class Mutation:
    """What one ``--mutate`` did."""

    #: Edited file -> how (one of :data:`EDITS`).
    edited: dict[str, str] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    #: Bytes written that the tree did not hold before (inserted, appended,
    #: overwritten, and the added files).
    new_bytes: int = 0


def mutate(root: Path, percent: float, seed: int) -> Mutation:
    """Edit, add and delete files of the corpus at ``root`` (see the module's nouns)."""
    files = listing(root)
    if not files:
        raise SystemExit(f"make_corpus: {root} holds no files to mutate")
    state = hashlib.sha256(repr(files).encode()).hexdigest()[:16]
    draws = Draws("mutate", seed, f"{percent:g}", state)  # 2 and 2.0 alike
    text = Text(seed)
    sizes = dict(files)
    filled = [path for path, size in files if size]
    chosen = set(draws.sample(filled, max(1, round(len(files) * percent / 100))))
    chosen.update(draws.sample([p for p in filled if sizes[p] >= MEDIA_AT_LEAST], 2))
    done = Mutation()
    cumulative = list(itertools.accumulate(EDIT_WEIGHTS))
    for number, relative in enumerate(sorted(chosen)):
        size = sizes[relative]
        if size >= MEDIA_AT_LEAST:
            how = "insert" if draws.chance(0.7) else "append"
            count = draws.log_uniform(KiB, 64 * KiB)
        else:
            how = draws.weighted(EDITS, cumulative)
            count = draws.log_uniform(16, max(32, size // 4))
        extension = _extension(relative)
        fresh = (
            text.make(draws, extension, count)
            if extension in TEXT_EXTENSIONS
            else stream_bytes(f"mutate:{seed}:{state}:{number}", count)
        )
        done.new_bytes += _edit(root / relative, how, fresh, size, draws)
        done.edited[relative] = how
    others = [path for path, _ in files if path not in chosen]
    done.deleted = sorted(draws.sample(others, max(2, len(chosen) // 20)))
    for relative in done.deleted:
        (root / relative).unlink()
    directories = sorted({str(Path(p).parent) for p, _ in files})
    for number in range(max(3, len(chosen) // 10) + 1):
        directory, extension, size = _addition(draws, directories, media=number == 0)
        if number == 0 and (root / "Videos").is_dir():
            directory = "Videos"
        while True:
            stem = f"new_{draws.pick(text.words)}_{draws.below(100_000):05d}"
            relative = Path(directory, stem + extension).as_posix()
            if not (root / relative).exists():
                break
        if extension in TEXT_EXTENSIONS:
            write_file(root / relative, text.make(draws, extension, size))
        else:
            write_file(root / relative, stream_blocks(f"add:{seed}:{state}:{number}", size))
        done.added.append(relative)
        done.new_bytes += size
    return done


def _edit(path: Path, how: str, fresh: bytes, size: int, draws: Draws) -> int:
    """Apply one edit to ``path``; the new bytes it wrote."""
    if how == "append":
        with path.open("ab") as out:
            out.write(fresh)
        return len(fresh)
    if how == "insert":
        data = path.read_bytes()
        at = draws.between(size // 4, 3 * size // 4)
        path.write_bytes(data[:at] + fresh + data[at:])
        return len(fresh)
    if how == "overwrite":
        fresh = fresh[: max(1, size // 2)]
        at = draws.between(0, size - len(fresh))
        with path.open("r+b") as out:
            out.seek(at)
            out.write(fresh)
        return len(fresh)
    with path.open("r+b") as out:
        out.truncate(int(size * (0.5 + 0.45 * draws.unit())))
    return 0


def _addition(draws: Draws, directories: Sequence[str], *, media: bool) -> tuple[str, str, int]:
    """Where a new file goes, its extension and its size."""
    directory = draws.pick(directories)
    if media:
        return directory, ".mp4", draws.log_uniform(5 * MiB, 15 * MiB)
    if draws.chance(0.8):
        return (
            directory,
            draws.pick((".py", ".md", ".txt", ".json", ".c")),
            draws.log_uniform(200, 16 * KiB),
        )
    return directory, draws.pick((".jpg", ".pdf", ".csv")), draws.log_uniform(100 * KiB, 2 * MiB)


# -- command line --------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size-mb", type=float, default=1024.0, help="corpus MiB (1024)")
    parser.add_argument("--seed", type=int, default=1, help="(1)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--mutate", type=float, metavar="PERCENT", help="edit OUT in place")
    mode.add_argument("--describe", action="store_true", help="print what OUT holds")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.describe:
        print("\n".join(describe(args.out).lines()))
        return
    if args.mutate is not None:
        before = listing(args.out)
        done = mutate(args.out, args.mutate, args.seed)
        after = listing(args.out)
        kinds = " ".join(f"{list(done.edited.values()).count(k)}-{k}" for k in EDITS)
        print(
            f"mutated {args.out}: edited={len(done.edited)} ({kinds}) added={len(done.added)} "
            f"deleted={len(done.deleted)} new_bytes={done.new_bytes} files={len(after)} "
            f"bytes={sum(s for _, s in after)} (was {sum(s for _, s in before)}) "
            f"seed={args.seed} elapsed={time.monotonic() - started:.1f}s"
        )
        return
    tally = generate(args.out, args.size_mb, args.seed)
    print(
        f"generated {args.out}: {tally.line()} seed={args.seed} "
        f"elapsed={time.monotonic() - started:.1f}s"
    )


if __name__ == "__main__":
    main()
