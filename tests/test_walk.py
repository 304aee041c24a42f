"""The walk's own decisions: hard-link groups and the file cache."""

from __future__ import annotations

import os
from pathlib import Path

from p2pbackup.engine.index import CachedFile, Index
from p2pbackup.engine.walk import FileCache, HardLinks


def test_hard_links_group_the_names_of_one_file_in_the_order_met(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    os.link(tmp_path / "a", tmp_path / "a2")
    (tmp_path / "b").write_text("b")
    os.link(tmp_path / "b", tmp_path / "b2")
    (tmp_path / "single").write_text("s")
    links = HardLinks[str]()
    st = {name: os.lstat(tmp_path / name) for name in ("a", "a2", "b", "b2", "single")}
    assert links.meet(st["b"], "b") == (1, "b")
    assert links.meet(st["a"], "a") == (2, "a")
    assert links.meet(st["single"], "single") == (0, "single")  # one name: no group
    assert links.meet(st["b2"], "b2") == (1, "b")
    assert links.meet(st["a2"], "a2") == (2, "a")
    assert links.meet(st["single"], "again") == (0, "again")


def test_a_file_is_unchanged_only_with_its_stat_and_every_chunk_stored(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("content")
    st = os.lstat(path)
    stored = {b"1" * 32}
    cache = FileCache(Index(tmp_path / "index.sqlite"), stored.__contains__)
    same = CachedFile(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, (b"1" * 32,))
    assert cache.unchanged(same, st)
    for changed in (
        CachedFile(st.st_size + 1, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, same.content),
        CachedFile(st.st_size, st.st_mtime_ns + 1, st.st_ctime_ns, st.st_ino, same.content),
        CachedFile(st.st_size, st.st_mtime_ns, st.st_ctime_ns + 1, st.st_ino, same.content),
        CachedFile(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino + 1, same.content),
        CachedFile(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, (b"2" * 32,)),
    ):
        assert not cache.unchanged(changed, st)
