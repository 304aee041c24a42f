"""The lister process: its pipe protocol, the child, and backups that list with it."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.app import operations
from p2pbackup.core.exclude import ExcludeRules
from p2pbackup.engine import lister, listing, listwire, snapshots
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.lister import Lister, ListerError, ListingAhead
from p2pbackup.engine.listwire import Listed, ListerSetup, ListwireError
from p2pbackup.engine.repository import Repository

from .engine_helpers import make_setup, make_tree

# -- the codec ----------------------------------------------------------------------------

names = st.binary(min_size=1, max_size=40).filter(lambda n: b"/" not in n and b"\0" not in n)
nanoseconds = st.integers(-(2**62), 2**62)


def stat_result(*fields: int) -> os.stat_result:
    """A stat result of the 13 fields a listing carries (listwire.stat_fields)."""
    mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime, blksize, blocks, rdev = fields
    seconds = [t // 10**9 for t in (atime, mtime, ctime)]
    return os.stat_result(
        (mode, ino, dev, nlink, uid, gid, size, *seconds,
         atime / 1e9, mtime / 1e9, ctime / 1e9, atime, mtime, ctime, blksize, blocks, rdev)
    )  # fmt: skip


stat_results = st.builds(
    stat_result,
    *([st.integers(0, 2**64 - 1)] * 7),
    nanoseconds,
    nanoseconds,
    nanoseconds,
    *([st.integers(0, 2**32)] * 3),
)
xattr_pairs = st.lists(st.tuples(names, st.binary(max_size=20)), max_size=3).map(
    lambda pairs: tuple(sorted(pairs))
)
listed_directories = st.one_of(
    st.builds(
        lambda path, entries, attributes: (
            path,
            sorted(entries.items()),
            {name: pairs for name, pairs in attributes.items() if name in entries and pairs},
        ),
        st.binary(min_size=1, max_size=60),
        st.dictionaries(names, stat_results, max_size=5),
        st.dictionaries(names, xattr_pairs, max_size=3),
    ),
    st.builds(
        lambda path, number, message: (path, OSError(number, message), {}),
        st.binary(min_size=1, max_size=60),
        st.integers(0, 200),
        st.text(max_size=30),
    ),
)


def body_of(frame: bytes) -> bytes:
    reader = listwire.frame_reader()
    reader.feed(frame)
    body = reader.next_body()
    assert body is not None and reader.buffered == 0
    return body


def comparable(listed: list[Listed], *, atime: bool = True) -> list[object]:
    """Listings with their lstats and errors as plain values (an OSError is
    equal only to itself; a stat result by its fields; without ``atime``,
    the access time left out: listing a directory may change its own)."""
    plain: list[object] = []
    for path, listing_, xattrs in listed:
        if isinstance(listing_, OSError):
            plain.append((path, type(listing_), listing_.errno, listing_.strerror, dict(xattrs)))
        else:
            entries = [
                (name, [v for i, v in enumerate(listwire.stat_fields(st_)) if atime or i != 7])
                for name, st_ in listing_
            ]
            plain.append((path, entries, dict(xattrs)))
    return plain


@given(st.lists(listed_directories, max_size=5))
def test_listings_round_trip(listed: list[Listed]) -> None:
    decoded = listwire.decode_frame(body_of(listwire.encode_listings(listed)))
    assert decoded is not None
    assert comparable(decoded) == comparable(listed)
    for (_, sent, _), (_, received, _) in zip(listed, decoded, strict=True):
        if isinstance(sent, list):
            assert isinstance(received, list)
            for (_, a), (_, b) in zip(sent, received, strict=True):
                assert (a.st_mtime_ns, a.st_ctime_ns, a.st_mode) == (
                    b.st_mtime_ns,
                    b.st_ctime_ns,
                    b.st_mode,
                )


def test_the_end_frame_ends() -> None:
    assert listwire.decode_frame(body_of(listwire.encode_end())) is None


@given(
    st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=3),
    st.lists(st.text(min_size=1, max_size=10).filter(str.strip), max_size=3),
    st.lists(names, max_size=2),
    st.booleans(),
)
def test_setup_round_trips(
    roots: list[bytes], patterns: list[str], markers: list[bytes], one_file_system: bool
) -> None:
    rules = ExcludeRules.from_patterns(
        patterns, if_present=[os.fsdecode(m) for m in markers], one_file_system=one_file_system
    )
    setup = ListerSetup(tuple(roots), rules)
    decoded = listwire.decode_setup(body_of(listwire.encode_setup(setup)))
    assert decoded.roots == setup.roots
    assert decoded.rules.patterns == rules.patterns
    assert decoded.rules.markers == rules.markers
    assert decoded.rules.one_file_system == one_file_system


@given(st.lists(listed_directories, min_size=1, max_size=4), st.data())
def test_frames_come_out_whole_whatever_pieces_the_bytes_arrive_in(
    listed: list[Listed], data: st.DataObject
) -> None:
    stream = b"".join(listwire.encode_listings([one]) for one in listed) + listwire.encode_end()
    reader = listwire.frame_reader()
    decoded: list[Listed] = []
    ended = False
    position = 0
    while position < len(stream):
        step = data.draw(st.integers(1, 9))
        reader.feed(stream[position : position + step])
        position += step
        while (body := reader.next_body()) is not None:
            frame = listwire.decode_frame(body)
            if frame is None:
                ended = True
            else:
                decoded.extend(frame)
    assert ended and reader.buffered == 0
    assert comparable(decoded) == comparable(listed)


def test_a_frame_fed_a_byte_at_a_time_appears_only_when_whole() -> None:
    frame = listwire.encode_listings([(b"/a", [(b"f", os.lstat(__file__))], {})])
    reader = listwire.frame_reader()
    for i, byte in enumerate(frame):
        assert reader.next_body() is None
        reader.feed(bytes([byte]))
        assert reader.buffered == i + 1
    decoded = listwire.decode_frame(reader.next_body() or b"")
    assert decoded is not None and [path for path, _, _ in decoded] == [b"/a"]


GOOD_ENTRY = [b"f", *listwire.stat_fields(os.lstat(__file__))]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xc1", "listings frame does not parse"),
        (body_of(listwire._frame([1, 1, [], [], [], False])), "expected a listings frame"),
        (body_of(listwire._frame([2])), "expected a listings frame"),
        (body_of(listwire._frame([2, [[b"/a", None, [GOOD_ENTRY]]]])), "expected 4 fields"),
        (
            body_of(listwire._frame([2, [[b"/a", None, [GOOD_ENTRY[:5]], {}]]])),
            "listing 0: an entry is not a name and 13 integers",
        ),
        (
            body_of(
                listwire._frame([2, [[b"/a", None, [[*GOOD_ENTRY[:3], "x", *GOOD_ENTRY[4:]]], {}]]])
            ),
            "listing 0: an entry is not a name and 13 integers",
        ),
        (
            body_of(
                listwire._frame([2, [[b"/a", None, [[*GOOD_ENTRY[:3], 1.5, *GOOD_ENTRY[4:]]], {}]]])
            ),
            "listing 0: an entry is not a name and 13 integers",
        ),
        (
            body_of(listwire._frame([2, [[b"/a", None, [], {b"f": [[b"user.a"]]}]]])),
            "listing 0 attribute: expected 2 fields",
        ),
        (
            body_of(listwire._frame([2, [[b"/a", [2], [], {}]]])),
            "listing 0 error: expected 2 fields",
        ),
    ],
)
def test_bad_listings_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(ListwireError, match=message):
        listwire.decode_frame(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (body_of(listwire.encode_end()), "expected a setup frame, got a frame of kind 3"),
        (body_of(listwire._frame([1, 9, [], [], [], False])), "version 9; this lister speaks 1"),
        (body_of(listwire._frame([1, 1, [], [""], [], False])), "exclude rules: "),
        (body_of(listwire._frame([1, 1, [], [], [], 0])), "one file system: expected a boolean"),
        (body_of(listwire._frame([1, 1])), "expected 6 fields, got 2"),
    ],
)
def test_a_bad_setup_frame_says_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(ListwireError, match=message):
        listwire.decode_setup(body)


# -- the child ------------------------------------------------------------------------------


def walked_here(root: Path, rules: ExcludeRules) -> list[Listed]:
    return list(listing.walk_listings(os.fsencode(root), rules, None, xattrs=True))


async def listed_by_lister(roots: list[Path], rules: ExcludeRules) -> list[Listed]:
    setup = ListerSetup(tuple(os.fsencode(r) for r in roots), rules)
    found: list[Listed] = []
    async with await Lister.start(setup) as child:
        while listings := await child.next_listings():
            found.extend(listings)
    return found


async def test_a_lister_lists_as_the_walk_does_in_its_order(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    for i in range(700):  # more than a frame's entries
        (source / "docs" / f"note-{i:03d}.txt").write_text(str(i))
    os.setxattr(source / "docs" / "note-001.txt", "user.colour", b"blue")
    (source / "cache").mkdir()
    (source / "cache" / "x.tmp").write_text("left out")
    (source / "marked").mkdir()
    (source / "marked" / ".nobackup").write_text("")
    (source / "marked" / "inside").mkdir()
    rules = ExcludeRules.from_patterns(["*.tmp", "cache"], if_present=[".nobackup"])
    expected = walked_here(source, rules)
    got = await listed_by_lister([source], rules)
    assert comparable(got, atime=False) == comparable(expected, atime=False)
    paths = [path for path, _, _ in got]
    assert os.fsencode(source / "cache") not in paths
    assert os.fsencode(source / "marked" / "inside") not in paths
    docs = dict((p, x) for p, _, x in got)[os.fsencode(source / "docs")]
    assert docs[b"note-001.txt"] == ((b"user.colour", b"blue"),)


async def test_a_lister_walks_its_roots_in_turn_and_names_what_it_cannot_list(
    tmp_path: Path,
) -> None:
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    rules = ExcludeRules()
    got = await listed_by_lister([tmp_path / "a", tmp_path / "missing", tmp_path / "b"], rules)
    assert [path for path, _, _ in got] == [
        os.fsencode(tmp_path / p) for p in ("a", "a/x", "missing", "b")
    ]
    missing = got[2][1]
    assert isinstance(missing, FileNotFoundError)
    assert missing.strerror == os.strerror(2)


SETUP = ListerSetup((b"/",), ExcludeRules())


async def test_a_killed_lister_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    stuck = "import sys, time; sys.stdin.buffer.read(1); time.sleep(60)"
    monkeypatch.setattr(lister, "LISTER_COMMAND", (sys.executable, "-c", stuck))
    async with await Lister.start(SETUP) as child:
        os.kill(child.pid, signal.SIGKILL)
        with pytest.raises(ListerError, match=rf"lister process {child.pid} failed: .*-9"):
            await child.next_listings()


async def test_a_lister_that_cannot_start_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lister, "LISTER_COMMAND", ("/nonexistent/python3", "-m", "x"))
    with pytest.raises(ListerError, match="cannot start a lister process"):
        await Lister.start(SETUP)


async def test_a_lister_sending_a_bad_frame_is_a_lister_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    child = "import os, sys; os.write(1, bytes([0, 0, 0, 1, 0xC1])); sys.stdin.buffer.read()"
    monkeypatch.setattr(lister, "LISTER_COMMAND", (sys.executable, "-c", child))
    async with await Lister.start(SETUP) as worker:
        with pytest.raises(ListerError, match=rf"lister process {worker.pid} sent a bad frame"):
            await worker.next_listings()


async def test_a_lister_closed_early_stops_of_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pipe of one page: the lister waits to send most of the listings.
    monkeypatch.setattr(lister, "_PIPE_SIZE", 4096)
    for i in range(2000):
        (tmp_path / f"d{i // 100}").mkdir(exist_ok=True)
        (tmp_path / f"d{i // 100}" / f"file-with-a-long-name-{i:05d}").write_text("")
    child = await Lister.start(ListerSetup((os.fsencode(tmp_path),), ExcludeRules()))
    assert await child.next_listings()
    await child.aclose()
    # It ended on the broken pipe, not killed after the grace period (-9).
    assert child._process.returncode == 0


# -- the walk ahead ---------------------------------------------------------------------


async def test_the_walk_ahead_falls_back_to_a_thread_when_the_lister_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_tree(tmp_path / "src")
    # A lister that sends its first frame, then dies.
    dying = (
        "import os, sys\n"
        "from p2pbackup.engine import listing\n"
        "real = listing.write_all\n"
        "def once(fd, data):\n"
        "    real(fd, data)\n"
        "    os._exit(3)\n"
        "listing.write_all = once\n"
        "listing.ENTRIES_PER_FRAME = 1\n"
        "listing.main()\n"
    )
    monkeypatch.setattr(lister, "LISTER_COMMAND", (sys.executable, "-P", "-c", dying))
    rules = ExcludeRules()
    ahead = ListingAhead(rules)
    got = []
    try:
        with caplog.at_level(logging.WARNING):
            for path, _, _ in walked_here(source, rules):
                got.append((path, await ahead.listing(path)))
    finally:
        await ahead.aclose()
    expected = walked_here(source, rules)
    assert comparable([(p, listing_, x) for p, (listing_, x) in got], atime=False) == comparable(
        expected, atime=False
    )
    assert "lister process" in caplog.text and "listing in a thread instead" in caplog.text


async def test_a_backup_with_its_lister_stores_what_one_listing_in_a_thread_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_tree(tmp_path / "src")
    (source / "skipped").mkdir()
    (source / "skipped" / "a.log").write_text("left out")
    os.setxattr(source / "skipped", "user.colour", b"red")
    setup = await make_setup(tmp_path)
    rules = ExcludeRules.from_patterns(["*.log"])
    trees = []
    for command in (lister.LISTER_COMMAND, None):
        monkeypatch.setattr(lister, "LISTER_COMMAND", command)
        async with operations.open_repository(setup.home) as repo:
            summary = await Backup(repo, exclude=rules).run([source])
            _, snap = snapshots.resolve(repo.index, "latest")
        trees.append(snap.tree)
        assert summary.excluded == 1
    # Listed by the child, then in a thread: the same trees, to the byte.
    assert trees[0] == trees[1]


async def test_one_lister_lists_every_target_from_before_the_peers_are_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Targets in an order the walk does not take ("a.b" sorts before "a/"
    # as bytes, after it by component), and a file among them.
    for name in ("a/x", "a.b/y", "c/z"):
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "f").write_text(name)
    (tmp_path / "src" / "loose.txt").write_text("a file")
    setup = await make_setup(tmp_path)
    events: list[str] = []
    real_start, real_probe = Lister.start, Repository.probe_peers

    async def start(lister_setup: ListerSetup) -> Lister:
        roots = [os.path.basename(root).decode() for root in lister_setup.roots]
        events.append("lister " + " ".join(roots))
        return await real_start(lister_setup)

    async def probe(self: Repository) -> None:
        events.append("probe")
        await real_probe(self)

    monkeypatch.setattr(Lister, "start", start)
    monkeypatch.setattr(Repository, "probe_peers", probe)
    targets = [tmp_path / "src" / n for n in ("c", "a.b", "loose.txt", "a")]
    async with operations.open_repository(setup.home) as repo:
        summary = await Backup(repo).run(targets)
    assert events == ["lister a a.b c", "probe"]
    assert summary.dirs == 6 and summary.files_new == 4
