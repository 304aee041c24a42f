"""Leaving the network: ``p2pbackup leave``.

Nouns:

* **our data** — every shard and the root record this home keeps on its
  peers. Each peer is asked to delete all of it in one request (a node:
  the signed ``DeleteAll``; a folder: its owner directory emptied), and
  answers with how many shards it deleted, or why it could not be asked.
  The shard rows of a peer that answered are forgotten, packs left with
  fewer than k shards are dropped from the index (so that a later backup
  cannot count on their blobs), and with no pack left the snapshots go too.
* **owners we store for** — the nodes whose shards this home's node keeps
  (its ``hosted.sqlite``). Each is sent a ``Leaving`` notice on a session
  to its node: a friend at the addresses the home's index keeps, any other
  through the DHT (the running node's, or a lookup of its own). An owner
  records us as leaving and its repair moves its shards elsewhere, reading
  them from us while we still serve.
* **report** — :class:`LeaveReport`: one answer per peer and per owner,
  and what the user should do next: keep serving until the owners have
  moved their shards, then stop.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from p2pbackup.app.home import Home
from p2pbackup.app.homedht import dht_locator
from p2pbackup.engine.progress import plural
from p2pbackup.engine.repository import Repository
from p2pbackup.errors import P2PBackupError, PeerUnavailableError
from p2pbackup.net.network import Address
from p2pbackup.node import shardhost
from p2pbackup.stores.folder import FolderShardStore
from p2pbackup.stores.remote import Locator, RemoteShardStore
from p2pbackup.wire.relay import Route
from p2pbackup.wire.session import Identity

#: Owners told at once.
NOTICES_AT_ONCE = 8
#: Seconds an owner's node has to be reached, at each address tried.
CONNECT_SECONDS = 10.0


@attrs.frozen
class PeerAnswer:
    """What one peer said when asked to delete our data."""

    peer_id: str
    shards: int = 0
    root: bool = False
    #: Why it could not be asked ("" when it answered).
    problem: str = ""

    def line(self) -> str:
        if self.problem:
            return f"peer {self.peer_id}: not deleted: {self.problem}"
        root = ", and our root record" if self.root else ""
        return f"peer {self.peer_id}: deleted {plural(self.shards, 'shard')}{root}"


@attrs.frozen
class OwnerAnswer:
    """What one owner we store for said to our notice."""

    node_id: str
    #: Whether it counts us among its peers (None: not reached).
    known: bool | None = None
    problem: str = ""

    def line(self) -> str:
        if self.known is None:
            return f"owner {self.node_id}: not told: {self.problem}"
        if self.known:
            return f"owner {self.node_id}: told; it will move its shards off this node"
        return f"owner {self.node_id}: told; it no longer counts on this node"


@attrs.frozen
class LeaveReport:
    peers: tuple[PeerAnswer, ...]
    owners: tuple[OwnerAnswer, ...]

    @property
    def ok(self) -> bool:
        return not any(peer.problem for peer in self.peers)

    def lines(self) -> list[str]:
        lines = [peer.line() for peer in self.peers]
        lines.extend(owner.line() for owner in self.owners)
        if self.owners:
            lines.append(
                "keep `p2pbackup serve` running until these owners have moved their "
                "shards (their next repair does it; `p2pbackup status` on this node shows "
                "what it still holds), then stop it"
            )
        else:
            lines.append("this node stores nothing for others: it can stop serving now")
        return lines

    def failure(self) -> str:
        unanswered = [peer.peer_id for peer in self.peers if peer.problem]
        return (
            f"{plural(len(unanswered), 'peer')} did not delete our data: run `p2pbackup leave` "
            "again when they are back"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "peers": [attrs.asdict(peer) for peer in self.peers],
            "owners": [attrs.asdict(owner) for owner in self.owners],
        }


async def leave(home: Home, repo: Repository) -> LeaveReport:
    """Delete our data everywhere and tell the owners we store for (module docstring)."""
    peers = await _delete_everywhere(repo)
    owners = await _tell_owners(home, repo)
    return LeaveReport(peers, owners)


async def _delete_everywhere(repo: Repository) -> tuple[PeerAnswer, ...]:
    answers: dict[str, PeerAnswer] = {}

    async def ask(peer_id: str) -> None:
        try:
            store = repo.store(peer_id)
            if not isinstance(store, RemoteShardStore | FolderShardStore):
                raise PeerUnavailableError("this kind of peer cannot be emptied")
            shards, root = await store.delete_all()
        except P2PBackupError as error:
            answers[peer_id] = PeerAnswer(peer_id, problem=str(error))
        else:
            answers[peer_id] = PeerAnswer(peer_id, shards, root)

    async with trio.open_nursery() as nursery:
        for peer in repo.peers():
            nursery.start_soon(ask, peer.peer_id)
    emptied = [peer_id for peer_id, answer in answers.items() if not answer.problem]
    with repo.index.transaction():
        repo.index.forget_shards_on(emptied)
    return tuple(answers[peer_id] for peer_id in sorted(answers))


async def _tell_owners(home: Home, repo: Repository) -> tuple[OwnerAnswer, ...]:
    owners = sorted(await trio.to_thread.run_sync(shardhost.usage_by_owner, home.hosted_path))
    if not owners:
        return ()
    friends = {friend.node_id: friend.addresses for friend in repo.index.friends()}
    identity = Identity.from_keyring(repo.keyring)
    locate = dht_locator(home, repo.network)
    answers: dict[bytes, OwnerAnswer] = {}
    limiter = trio.CapacityLimiter(NOTICES_AT_ONCE)

    async def tell(owner: bytes) -> None:
        async with limiter:
            answers[owner] = await _tell(repo, identity, owner, friends.get(owner, ()), locate)

    async with trio.open_nursery() as nursery:
        for owner in owners:
            nursery.start_soon(tell, owner)
    return tuple(answers[owner] for owner in owners)


async def _tell(
    repo: Repository,
    identity: Identity,
    owner: bytes,
    known: Sequence[str],
    locate: Locator,
) -> OwnerAnswer:
    """Send one owner the notice: at its friend addresses, else where the DHT says."""
    name = owner.hex()
    addresses: list[Address] = []
    for text in known:
        try:
            addresses.append(Address.parse(text, allow_port_zero=False))
        except P2PBackupError:
            continue
    routes: list[Route] = [Route(address) for address in addresses]
    try:
        if not routes:
            routes = list(await locate(owner))
    except P2PBackupError as error:
        return OwnerAnswer(name, problem=f"looking it up failed: {error}")
    if not routes:
        return OwnerAnswer(name, problem="no address known for it (it is not in the DHT)")
    problems = []
    for route in routes:
        store = RemoteShardStore(
            repo.network, identity, route.address, owner, connect_timeout=CONNECT_SECONDS
        )
        store.route = route  # a relayed route is dialled through its relay
        try:
            return OwnerAnswer(name, known=await store.notify_leaving())
        except P2PBackupError as error:
            problems.append(str(error))
        finally:
            await store.aclose()
    return OwnerAnswer(name, problem="; ".join(problems))
