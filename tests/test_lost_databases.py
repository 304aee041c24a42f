"""A home that lost a database, or had its secret cut short, through real processes.

The owner: an index that is missing or empty is an error that points at
``recover``, never a new empty index that says "no snapshots yet".
"""

from __future__ import annotations

from pathlib import Path

from .cli_helpers import (
    cli_error,
    cli_ok,
    make_source,
    make_world,
)


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
