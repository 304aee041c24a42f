"""A home that lost a database, or had its secret cut short, through real processes.

The storage node: ``serve`` on a home whose ``hosted.sqlite`` is gone, empty,
or lost the rows only its ``-wal`` file held (a SIGKILL, then a copy of the
home that left that file behind) keeps every shard file and lists them again;
the owner then restores from that node alone. Files it cannot account for
make ``serve`` refuse to start, changing nothing. The owner: an index that is
missing or empty is an error that points at ``recover``, never a new empty
index that says "no snapshots yet".
"""

from __future__ import annotations

import shutil
from pathlib import Path

from p2pbackup.app.home import Home

from .cli_helpers import (
    cli_error,
    cli_inprocess,
    cli_ok,
    make_source,
    make_world,
    restored,
    tree_state,
)
from .test_network_e2e import ServeProcess


def serving_home(root: Path) -> ServeProcess:
    home = root / "home"
    assert cli_inprocess("--home", home, "init", "--recovery-key-file", root / "key") == 0
    return ServeProcess(home, Home(home).node_id().hex())


def lose_database(hosted: Path, how: str) -> None:
    db = hosted / "hosted.sqlite"
    for name in ("hosted.sqlite-wal", "hosted.sqlite-shm"):
        (hosted / name).unlink(missing_ok=True)
    if how == "deleted":
        db.unlink()
    elif how == "emptied":
        db.write_bytes(b"")
    else:
        assert how == "wal lost"  # the schema stays; the rows were in the -wal file


def test_serve_keeps_every_shard_when_its_database_is_lost(tmp_path: Path) -> None:
    node = serving_home(tmp_path / "node")
    owner = make_world(tmp_path / "owner", k=1, n=2, peers=1)  # one folder, and the node
    source = make_source(tmp_path / "source", big=200_000)
    before = tree_state(source)
    try:
        node.start()
        owner.ok("peer", "add", node.address, node.node_id)
        owner.backup(source)
        shards = node.hosted_shards()
        assert shards
        for how in ("wal lost", "emptied", "deleted"):
            # SIGKILL: the rows stay in the -wal file, as they would after a crash.
            node.kill()
            lose_database(node.home / "hosted", how)
            node.start(node.address)
            assert node.hosted_shards() == shards, how
            found = [line for line in node.started if "shard file" in line]
            if how == "wal lost":
                assert found == [
                    f"listed {len(shards)} shard files again whose row was missing "
                    "(their leases restart at 366 days)"
                ]
            else:
                assert found == [
                    f"hosted.sqlite was missing or empty: rebuilt it from the {len(shards)} "
                    "shard files found (their leases restart at 366 days)"
                ]
        # The folder is gone: the node alone restores everything.
        shutil.rmtree(owner.peers[0] / "p2pbackup-peer" / "owners")
        target = tmp_path / "restored"
        owner.ok("restore", "latest", "--target", target)
        assert tree_state(restored(target, source)) == before
    finally:
        errors = node.stop()
    assert "Traceback" not in errors


def test_serve_refuses_to_start_with_files_it_cannot_account_for(tmp_path: Path) -> None:
    node = serving_home(tmp_path / "node")
    hosted = node.home / "hosted"
    stray = hosted / "shards" / ("ab" * 20) / "cd" / ("cd" * 32)
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not a shard of this version")
    message = cli_error("serve", "--listen", "127.0.0.1:0", home=node.home)
    assert message.startswith(f"the shard host database {hosted / 'hosted.sqlite'} is missing")
    assert str(stray) in message and "nothing was changed" in message
    assert stray.read_bytes() == b"not a shard of this version"
    stray.unlink()
    try:
        node.start()  # with the stray moved away, the node starts
    finally:
        assert "Traceback" not in node.stop()


def test_a_lost_index_is_an_error_that_points_at_recover(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=2, n=3)
    world.backup(make_source(tmp_path / "source", big=10_000))
    index = world.home / "index.sqlite"
    for path in world.home.glob("index.sqlite-*"):
        path.unlink()
    index.write_bytes(b"")  # cut to nothing
    for command in (["snapshots"], ["backup", tmp_path / "source"], ["status"]):
        message = world.error(*command)
        assert message.startswith(f"the index {index} is missing or empty"), message
        assert "`p2pbackup recover`" in message
    assert index.read_bytes() == b""  # still empty: nothing was made in its place
    index.unlink()
    assert "is missing or empty" in world.error("snapshots")
    assert not index.exists()
    # `recover` with the key, into a new home, finds the snapshots again.
    fresh = tmp_path / "fresh"
    args = [arg for peer in world.peers for arg in ("--peer-dir", str(peer))]
    cli_ok("recover", *args, "--recovery-key-file", world.key_file, home=fresh)
    assert len(cli_ok("snapshots", "--json", home=fresh).stdout.strip()) > 2


def test_a_secret_cut_short_is_one_clear_line(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=2, n=3)
    secret = world.home / "secret"
    whole = secret.read_bytes()
    for cut in (whole[:30], whole[:-10], whole[:-1] + b"\xff\n"):
        secret.write_bytes(cut)
        for command in (["snapshots"], ["serve", "--listen", "127.0.0.1:0"]):
            message = cli_error(*command, home=world.home)
            assert str(secret) in message, (cut, message)
