"""The benchmarks' corpus generator (benchmarks/make_corpus.py): the same tree
for the same seed, the home-directory mix its docstring promises, and a
``--mutate`` that changes exactly what it reports."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "make_corpus.py"
MiB = 1 << 20
#: Large enough for every size class and a media copy (two media files).
SIZE_MB = 24


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_corpus", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


make_corpus = load_generator()


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True
    )
    return done.stdout


def tree(root: Path) -> dict[str, str]:
    """Every directory and file under ``root``: a file by the digest of its bytes."""
    found: dict[str, str] = {}
    for directory, dirs, names in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), root)] = "dir"
        for name in names:
            data = Path(directory, name).read_bytes()
            found[os.path.relpath(os.path.join(directory, name), root)] = hashlib.sha256(
                data
            ).hexdigest()
    return found


def words(line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "seed1"
    run(str(root), "--size-mb", str(SIZE_MB), "--seed", "1")
    return root


def test_the_same_seed_gives_the_same_tree(corpus: Path, tmp_path: Path) -> None:
    run(str(tmp_path / "again"), "--size-mb", str(SIZE_MB), "--seed", "1")
    assert tree(tmp_path / "again") == tree(corpus)
    run(str(tmp_path / "other"), "--size-mb", str(SIZE_MB), "--seed", "2")
    assert not contents(tmp_path / "other") & contents(corpus)


def contents(root: Path) -> set[str]:
    """The digests of the files under ``root`` that are not empty."""
    return set(tree(root).values()) - {"dir", hashlib.sha256(b"").hexdigest()}


def test_a_corpus_refuses_a_directory_in_use(corpus: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(corpus), "--size-mb", "1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "exists and is not empty" in done.stderr


def test_the_mix_is_a_home_directory(corpus: Path) -> None:
    found = make_corpus.describe(corpus)
    assert found.bytes == SIZE_MB * MiB
    assert (found.empty_files, found.empty_dirs) == (2, 2)
    assert 3 <= found.depth <= make_corpus.MAX_DEPTH
    files = make_corpus.listing(corpus)
    media = [(p, s) for p, s in files if s >= make_corpus.MEDIA_AT_LEAST]
    small = [(p, s) for p, s in files if 0 < s < make_corpus.SMALL_BELOW]
    documents = [(p, s) for p, s in files if make_corpus.SMALL_BELOW <= s < 4 * MiB]
    assert all(5 * MiB <= s <= 50 * MiB for _, s in media)
    # Media get at most their 60 %, less what was too little for one more file.
    assert 0.35 * found.bytes <= sum(s for _, s in media) <= 0.6 * found.bytes
    assert documents and all(100 * 1024 <= s <= 2 * MiB for _, s in documents)
    assert len(small) > 10 * len(documents)
    assert sum(s for _, s in small) >= 0.15 * found.bytes
    text = [p for p, _ in small if make_corpus._extension(p) in make_corpus.TEXT_EXTENSIONS]
    assert 0.7 * len(small) <= len(text) < len(small)  # mostly source, some binaries
    # Copies: about one file in twenty, a media file among them, in another directory.
    assert 0.02 * found.files <= found.copies <= 0.1 * found.files
    by_digest: dict[str, list[str]] = {}
    for path, _size in media:
        digest = hashlib.sha256((corpus / path).read_bytes()).hexdigest()
        by_digest.setdefault(digest, []).append(path)
    copied = [paths for paths in by_digest.values() if len(paths) > 1]
    assert copied and all(len({str(Path(p).parent) for p in paths}) > 1 for paths in copied)
    # Text compresses like text; media do not compress at all.
    assert found.zlib_text_bytes < 0.5 * found.text_bytes
    path = media[0][0]
    assert len(zlib.compress((corpus / path).read_bytes()[: 4 * MiB])) >= 4 * MiB


def test_mutate_changes_what_it_says(corpus: Path, tmp_path: Path) -> None:
    before = tree(corpus)
    sizes = dict(make_corpus.listing(corpus))
    by_cli, by_call = tmp_path / "cli", tmp_path / "call"
    shutil.copytree(corpus, by_cli)
    shutil.copytree(corpus, by_call)
    line = run(str(by_cli), "--mutate", "2", "--seed", "1")
    done = make_corpus.mutate(by_call, 2, 1)
    after = tree(by_call)
    assert tree(by_cli) == after  # repeatable: the same edit from the same tree
    said = words(line)
    assert int(said["edited"]) == len(done.edited)
    assert int(said["added"]) == len(done.added)
    assert int(said["deleted"]) == len(done.deleted)
    assert int(said["new_bytes"]) == done.new_bytes

    assert set(after) - set(before) == set(done.added)
    assert set(before) - set(after) == set(done.deleted)
    changed = {p for p in set(before) & set(after) if before[p] != after[p]}
    assert changed == set(done.edited)
    wanted = max(1, round(sum(1 for v in before.values() if v != "dir") * 2 / 100))
    assert wanted <= len(done.edited) <= wanted + 2
    media = [p for p in done.edited if sizes[p] >= make_corpus.MEDIA_AT_LEAST]
    assert len(media) >= 2 or len(media) == sum(
        1 for s in sizes.values() if s >= make_corpus.MEDIA_AT_LEAST
    )
    new_sizes = dict(make_corpus.listing(by_call))
    grown = 0
    for path, how in done.edited.items():
        old, new = sizes[path], new_sizes[path]
        assert {
            "append": new > old,
            "insert": new > old,
            "overwrite": new == old,
            "truncate": new < old,
        }[how], (path, how, old, new)
        grown += max(0, new - old)
    assert any(new_sizes[p] >= 5 * MiB for p in done.added)  # one new media file
    assert done.new_bytes >= grown + sum(new_sizes[p] for p in done.added)

    # A second mutation of the edited tree makes another edit.
    again = make_corpus.mutate(by_call, 2, 1)
    assert set(again.edited) != set(done.edited) or again.added != done.added
