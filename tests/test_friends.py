"""Friends: invite codes in, friends and node peers out, on the in-memory network.

Homes serve one another from this process (a StorageServer with the home's own
identity, as `serve` runs it) over :class:`~p2pbackup.net.memory.MemoryNetwork`; the
command-line tests at the end run ``cli.main`` in this process.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import daemon, operations
from p2pbackup.app.home import Home
from p2pbackup.cli import main as cli
from p2pbackup.core.keys import Keyring
from p2pbackup.dht import discovery, invites, records
from p2pbackup.dht.records import RecordAddress
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.index import ShardShortfall
from p2pbackup.engine.repository import Repository
from p2pbackup.errors import PeerUnavailableError, UsageError
from p2pbackup.model import PEER_KIND_NODE, FriendRecord
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.wire.session import Identity

from .engine_helpers import SMALL, make_tree
from .net_helpers import start_node

PORT = 47470


def keyring_of(home: Home) -> Keyring:
    return Keyring.from_master_secret(home.load_secret())


def new_home(root: Path, name: str, *, k: int = 1, n: int = 2) -> Home:
    home = Home(root / name)
    operations.init_home(home, attrs.evolve(SMALL, k=k, n=n))
    return home


async def serve_home(nursery: trio.Nursery, world: MemoryNetwork, home: Home, host: str) -> None:
    """Serve ``home`` as its own node at ``host:PORT`` until the nursery ends."""
    shard_host = ShardHost.open(home.hosted_path)
    server = StorageServer(shard_host, Identity.from_keyring(keyring_of(home)))
    await nursery.start(world.interface(host).serve, Address(host, PORT), server.handle_connection)
    nursery.start_soon(close_when_cancelled, shard_host)


async def close_when_cancelled(shard_host: ShardHost) -> None:
    try:
        await trio.sleep_forever()
    finally:
        shard_host.close()


@attrs.define
class Friends:
    world: MemoryNetwork
    alice: Home
    bob: Home
    root: Path

    def repository(self) -> contextlib.AbstractAsyncContextManager[Repository]:
        return operations.open_repository(self.alice, network=self.world.interface("alice"))

    def invite(self, home: Home, hosts: Sequence[str]) -> str:
        return operations.make_invite(home, [f"{host}:{PORT}" for host in hosts])


@pytest.fixture
async def friends(tmp_path: Path, nursery: trio.Nursery) -> Friends:
    world = MemoryNetwork(seed=4, default_link=LinkProfile(latency=0.0005), connect_timeout=0.5)
    alice = new_home(tmp_path, "alice")
    bob = new_home(tmp_path, "bob")
    await serve_home(nursery, world, bob, "bob")
    return Friends(world, alice, bob, tmp_path)


# -- invite -----------------------------------------------------------------------------


def test_invite_from_given_addresses_or_from_what_serve_wrote(tmp_path: Path) -> None:
    home = new_home(tmp_path, "home")
    public = keyring_of(home).identity_public
    with pytest.raises(UsageError, match=r"no known address: start `p2pbackup serve` first"):
        operations.make_invite(home)

    # serve wrote these; the wildcard it listens on is no use to a friend.
    home.write_addresses(["0.0.0.0:47470", "Home.Example.org:47470", "[2001:db8::1]:47471"])
    invite = invites.decode_invite(operations.make_invite(home))
    assert invite.public_key == public
    assert invite.node_id == keyring_of(home).node_id
    assert invite.addresses == (
        RecordAddress("home.example.org", 47470),
        RecordAddress("2001:db8::1", 47471),
    )

    # Given addresses win over the file.
    code = operations.make_invite(home, ["203.0.113.9:5000", "203.0.113.9:5000"])
    assert invites.decode_invite(code) == invites.Invite(
        public, (RecordAddress("203.0.113.9", 5000),)
    )

    home.write_addresses(["0.0.0.0:47470"])
    with pytest.raises(UsageError, match="no known address"):
        operations.make_invite(home)
    for bad, expected in [
        (["0.0.0.0:1"], "every interface"),
        (["host:0"], "out of range"),
        (["host"], "missing its port"),
        ([f"h{i}:1" for i in range(5)], "at most 4"),
    ]:
        with pytest.raises(UsageError, match=expected):
            operations.make_invite(home, bad)


# -- friend add ---------------------------------------------------------------------------


async def test_a_reachable_friend_becomes_a_node_peer_at_its_address(friends: Friends) -> None:
    bob_id = keyring_of(friends.bob).node_id
    code = friends.invite(friends.bob, ["bob"])
    async with friends.repository() as repo:
        added = await operations.add_friend(repo, code, now=lambda: 1_700_000_000.5)
        assert added.reached and added.warnings == ()
        assert added.friend == FriendRecord(
            bob_id, keyring_of(friends.bob).identity_public, (f"bob:{PORT}",), 1_700_000_000
        )
        assert repo.index.friend(bob_id) == added.friend
        [peer] = repo.peers()
        assert (peer.peer_id, peer.kind, peer.location) == (
            bob_id.hex(),
            PEER_KIND_NODE,
            "bob:47470",
        )
        assert await repo.store(peer.peer_id).usage() == 0
        [status] = operations.friends(repo)
        assert (status.friend, status.location, status.shards) == (added.friend, "bob:47470", 0)


async def test_an_offline_friend_is_added_with_a_warning(friends: Friends) -> None:
    code = friends.invite(friends.bob, ["bob-laptop", "bob-desktop"])  # neither answers
    async with friends.repository() as repo:
        added = await operations.add_friend(repo, code)
        assert not added.reached
        [warning] = added.warnings
        assert "could not be reached now" in warning and "bob-laptop" in warning
        assert "bob-desktop" in warning
        assert added.peer.location == "bob-laptop:47470"  # the first address, until it answers
        assert added.friend.addresses == ("bob-laptop:47470", "bob-desktop:47470")
        assert [p.peer_id for p in repo.peers()] == [keyring_of(friends.bob).node_id.hex()]


async def test_a_wrong_node_at_the_address_is_never_trusted(
    friends: Friends, nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Mallory listens where Bob's invite says Bob is, with a key of her own.
    mallory = await start_node(
        nursery,
        friends.world.interface("mallory"),
        tmp_path / "mallory",
        name="mallory",
        listen=Address("mallory", PORT),
    )
    bob_public = keyring_of(friends.bob).identity_public
    bob_id = keyring_of(friends.bob).node_id
    only_mallory = invites.encode_invite(
        invites.Invite(bob_public, (RecordAddress("mallory", PORT),))
    )
    mallory_then_bob = invites.encode_invite(
        invites.Invite(bob_public, (RecordAddress("mallory", PORT), RecordAddress("bob", PORT)))
    )
    async with friends.repository() as repo:
        added = await operations.add_friend(repo, only_mallory)
        assert not added.reached
        [warning] = added.warnings
        assert mallory.identity.node_id.hex() in warning  # "mallory:47470 is node …"
        # Every session must prove Bob's key: Mallory's address stays useless.
        with pytest.raises(PeerUnavailableError, match=mallory.identity.node_id.hex()):
            await repo.store(bob_id.hex()).usage()
        assert mallory.host.list(repo.keyring.node_id, None, 10)[0] == []

    async with operations.open_repository(
        new_home(tmp_path, "carol"), network=friends.world.interface("carol")
    ) as repo:
        added = await operations.add_friend(repo, mallory_then_bob)
        assert added.reached
        assert added.peer.location == f"bob:{PORT}"
        assert added.warnings == ()


async def test_a_friend_twice_or_the_own_code_is_refused(friends: Friends) -> None:
    code = friends.invite(friends.bob, ["bob"])
    own = friends.invite(friends.alice, ["alice"])
    bob_id = keyring_of(friends.bob).node_id.hex()
    async with friends.repository() as repo:
        with pytest.raises(UsageError, match="this home's own invite code"):
            await operations.add_friend(repo, own)
        await operations.add_friend(repo, code)
        with pytest.raises(UsageError, match=f"node {bob_id} is already a friend"):
            await operations.add_friend(repo, code)
        assert len(repo.index.friends()) == 1 and len(repo.peers()) == 1


async def test_a_node_already_a_peer_keeps_its_peer_row(friends: Friends) -> None:
    bob_id = keyring_of(friends.bob).node_id
    async with friends.repository() as repo:
        await operations.add_node_peer(repo, f"bob:{PORT}", bob_id.hex())
        code = friends.invite(friends.bob, ["bob-elsewhere"])
        added = await operations.add_friend(repo, code)
        assert not added.reached  # the invite's address is stale ...
        [peer] = repo.peers()
        assert peer.location == f"bob:{PORT}"  # ... and the working peer row is kept
        assert added.peer == peer
        assert repo.index.friend(bob_id) is not None


# -- friend remove --------------------------------------------------------------------------


async def test_remove_refuses_a_friend_holding_shards_unless_forced(
    friends: Friends, nursery: trio.Nursery, tmp_path: Path
) -> None:
    carol = new_home(tmp_path, "carol")
    await serve_home(nursery, friends.world, carol, "carol")
    dave = new_home(tmp_path, "dave")
    bob_id = keyring_of(friends.bob).node_id.hex()
    async with friends.repository() as repo:
        await operations.add_friend(repo, friends.invite(friends.bob, ["bob"]))
        await operations.add_friend(repo, friends.invite(carol, ["carol"]))
        await operations.add_friend(repo, friends.invite(dave, ["dave"]))  # offline
        await Backup(repo).run([make_tree(tmp_path / "src", big=200_000)])
        held = repo.index.shard_count_by_peer()[bob_id]
        packs = len(repo.index.pack_ids())
        assert held > 0

        # A friend holding nothing goes without --force.
        removed = await operations.remove_friend(repo, keyring_of(dave).node_id.hex())
        assert removed.shards_forgotten == 0

        with pytest.raises(UsageError) as info:
            await operations.remove_friend(repo, bob_id[:8])
        assert str(info.value) == (
            f"node {bob_id} holds {held} shards of this home's packs; "
            f"`friend remove --force {bob_id}` forgets them, leaving those packs less redundant"
        )
        assert repo.index.friend(bytes.fromhex(bob_id)) is not None

        removed = await operations.remove_friend(repo, bob_id[:8], force=True)
        assert removed.shards_forgotten == held
        assert removed.shortfall.below_n == packs  # 1-of-2: every pack had a shard on each
        assert removed.shortfall.below_k == 0
        assert removed.warnings == ()
        assert repo.index.friend(bytes.fromhex(bob_id)) is None
        assert bob_id not in repo.index.shard_count_by_peer()
        assert [p.peer_id for p in repo.peers()] == [keyring_of(carol).node_id.hex()]
        assert [s.friend.node_id for s in operations.friends(repo)] == [keyring_of(carol).node_id]

        # The last holder too: nothing is left to restore from, and it says so.
        removed = await operations.remove_friend(repo, keyring_of(carol).node_id.hex(), force=True)
        assert removed.shortfall == ShardShortfall(below_n=packs, below_k=packs)
        assert repo.peers() == [] and repo.index.shard_count_by_peer() == {}


async def test_a_friend_is_named_by_a_unique_prefix_of_eight_digits(friends: Friends) -> None:
    twins = [bytes.fromhex("aabbccdd00" + "11" * 15), bytes.fromhex("aabbccdd01" + "11" * 15)]
    async with friends.repository() as repo:
        with repo.index.transaction():
            for node_id in twins:
                repo.index.add_friend(FriendRecord(node_id, bytes(32), ("h:1",), 0))
        for text, expected in [
            ("aabbccd", "too short"),
            ("aabbccdd", "could be any of 2 friends"),
            ("ffffffff", "no friend has a node id starting with ffffffff"),
            ("xyzxyzxyz", "not a node id"),
            ("aa" * 21, "longer than a node id"),
        ]:
            with pytest.raises(UsageError, match=expected):
                operations.find_friend(repo, text)
        assert operations.find_friend(repo, " AABBCCDD01 ").node_id == twins[1]
        removed = await operations.remove_friend(repo, "aabbccdd01")
        assert removed.friend.node_id == twins[1]
        assert [f.node_id for f in repo.index.friends()] == [twins[0]]
        assert repo.index.set_friend_addresses(twins[0], ["a:1", "[::1]:2"])
        friend = repo.index.friend(twins[0])
        assert friend is not None and friend.addresses == ("a:1", "[::1]:2")
        assert not repo.index.set_friend_addresses(twins[1], ["a:1"])


# -- the command line -------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, list[str], str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out.splitlines(), captured.err


def error_line(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    code, _out, err = run(capsys, *args)
    assert code == cli.EXIT_ERROR
    [line] = err.splitlines()
    assert line.startswith("p2pbackup: error: ")
    return line.removeprefix("p2pbackup: error: ")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_invite_and_friends_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    for home in (alice, bob):
        assert (
            run(capsys, "--home", home, "init", "--recovery-key-file", home.with_suffix(".key"))[0]
            == 0
        )
    address = f"127.0.0.1:{closed_port()}"  # Bob is offline
    code, out, err = run(capsys, "--home", bob, "invite", "--address", address)
    assert (code, err) == (0, "")
    invite = invites.decode_invite(out[-1])
    assert out[-1].startswith("p2pb-") and out[-1] == out[-1].strip()
    assert len(out) > 1  # an explanation first
    bob_id = invite.node_id.hex()

    code, out, err = run(capsys, "--home", alice, "friend", "add", out[-1])
    assert (code, err) == (0, "")
    assert out[0].startswith(f"warning: node {bob_id} could not be reached now (")
    assert out[0].endswith(
        "); it is added anyway, and used once it answers and proves the key in its invite code"
    )
    assert out[-1] == f"added friend {bob_id}, to be reached at {address}"

    code, out, _ = run(capsys, "--home", alice, "friend", "list", "--json")
    assert code == 0
    [listed] = json.loads("\n".join(out))
    assert listed["node_id"] == bob_id
    assert listed["addresses"] == [address]
    assert listed["shards"] == 0 and listed["location"] == address
    code, out, _ = run(capsys, "--home", alice, "friend", "list")
    assert out == [f"{bob_id}  {address}  0 shards"]

    assert "already a friend" in error_line(
        capsys, "--home", alice, "friend", "add", invites.encode_invite(invite)
    )
    code, out, _ = run(capsys, "--home", alice, "friend", "remove", bob_id[:10])
    assert code == 0 and out == [f"removed friend {bob_id}"]
    assert run(capsys, "--home", alice, "friend", "list")[1][0].startswith("no friends yet")
    assert run(capsys, "--home", alice, "peer", "list")[1][0].startswith("no peers yet")


def test_a_damaged_code_is_one_line_and_exit_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    assert run(capsys, "--home", home, "init", "--recovery-key-file", tmp_path / "key")[0] == 0
    code = operations.make_invite(Home(home), ["192.0.2.1:47470"])
    typo = code[:30] + ("a" if code[30] != "a" else "b") + code[31:]
    assert error_line(capsys, "--home", home, "friend", "add", typo) == (
        "the invite code is damaged: a character is wrong, missing or extra — copy it again"
    )
    assert error_line(capsys, "--home", home, "friend", "add", code[5:]) == (
        "not an invite code: it should start with p2pb-"
    )
    assert "'1'" in error_line(capsys, "--home", home, "friend", "add", code + "1")
    assert "own invite code" in error_line(capsys, "--home", home, "friend", "add", code)
    assert "no known address" in error_line(capsys, "--home", home, "invite")
    assert "too short" in error_line(capsys, "--home", home, "friend", "remove", "abc")


def test_lookup_prints_the_record_or_says_it_found_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    assert run(capsys, "--home", home, "init", "--recovery-key-file", tmp_path / "key")[0] == 0
    seed = bytes(range(32))
    record = records.sign_contact(
        seed,
        addresses=[RecordAddress("192.0.2.7", 47470), RecordAddress("2001:db8::7", 47470)],
        storage_offered=200 << 30,
        sequence=7,
        now=1_700_000_000,
        lifetime=3600,
    )
    asked: list[tuple[bytes, list[Address]]] = []

    async def found(
        remembered: object,
        node_id: bytes,
        *,
        bootstrap: Sequence[Address] = (),
        network: object = None,
        friends: object = (),
    ) -> records.ContactRecord | None:
        asked.append((node_id, list(bootstrap)))
        return record if node_id == record.node_id else None

    monkeypatch.setattr(discovery, "lookup_contact", found)
    node_hex = record.node_id.hex()
    code, out, err = run(
        capsys, "--home", home, "lookup", node_hex, "--bootstrap", "10.0.0.1:47470",
        "--bootstrap", "[2001:db8::1]:47470",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert asked == [(record.node_id, [Address("10.0.0.1", 47470), Address("2001:db8::1", 47470)])]
    assert out[0] == f"node {node_hex}"
    assert out[1] == "addresses: 192.0.2.7:47470, [2001:db8::7]:47470"
    assert "200" in out[2] and out[2].startswith("storage offered: ")
    sequence, _, expires = out[3].partition(", expires ")
    assert sequence == "record #7"
    when = datetime.datetime.fromisoformat(expires)
    assert when.tzinfo is not None and when.timestamp() == 1_700_003_600

    code, out, _ = run(capsys, "--home", home, "lookup", node_hex, "--json")
    shown = json.loads("\n".join(out))
    assert shown["node_id"] == node_hex and shown["sequence"] == 7
    assert datetime.datetime.fromisoformat(shown["expires"]).timestamp() == 1_700_003_600
    assert shown["expiry"] == 1_700_003_600 and shown["storage_offered"] == 200 << 30
    assert shown["addresses"] == ["192.0.2.7:47470", "[2001:db8::7]:47470"]

    other = "cd" * 20
    message = error_line(capsys, "--home", home, "lookup", other)
    assert f"no valid contact record for node {other}" in message
    assert "not a node id" in error_line(capsys, "--home", home, "lookup", "nope")
    assert "port" in error_line(capsys, "--home", home, "lookup", other, "--bootstrap", "h")


def test_serve_passes_bootstrap_and_advertise_to_the_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    assert run(capsys, "--home", home, "init", "--recovery-key-file", tmp_path / "key")[0] == 0
    seen: list[daemon.ServeOptions] = []

    async def serve(home: Home, options: daemon.ServeOptions, **_: object) -> None:
        seen.append(options)
        raise UsageError("stopped by the test")

    monkeypatch.setattr(daemon, "serve", serve)
    message = error_line(
        capsys, "--home", home, "serve", "--listen", "127.0.0.1:0",
        "--bootstrap", "10.0.0.1:47470", "--bootstrap", "seed.example.org:1",
        "--advertise", "[2001:db8::5]:47470",
    )  # fmt: skip
    assert message == "stopped by the test"
    [options] = seen
    assert options.listen == Address("127.0.0.1", 0)
    assert options.bootstrap == (Address("10.0.0.1", 47470), Address("seed.example.org", 1))
    assert options.advertise == (Address("2001:db8::5", 47470),)
    assert "out of range" in error_line(capsys, "--home", home, "serve", "--bootstrap", "h:0")
