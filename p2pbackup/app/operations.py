"""User-level operations on a home: init, open, add a peer, friends, recover.

This is the composition root of the backup engine: it turns a home directory
into a :class:`~p2pbackup.engine.repository.Repository` (keyring, index, peers) and
holds the home's lock while anything writes to it.

Friends: :func:`make_invite` writes this home's invite code
(:mod:`p2pbackup.dht.invites`); :func:`add_friend` reads another's, checks that
the node answers at one of its addresses as the key in the code (the Noise
handshake proves it), and records it as a friend and as a node peer in one
transaction. A friend that cannot be reached now is added all the same (home
machines sleep), with a warning: every later session still has to prove the
key, so an address that leads to another node is never trusted.

Every command imports this module, most of them to open a repository and
read its index. So the parts only some need are imported by the functions
that use them: the DHT (:mod:`p2pbackup.app.homedht`: kademlia and
trio-asyncio) at a locator's first lookup or a recovery's, the hosting and
delegation parts (:mod:`p2pbackup.maintenance`, :mod:`p2pbackup.node`) by
``status`` and ``recover``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import attrs
import trio

from p2pbackup.app.home import Home
from p2pbackup.core import chunker, delegation, formats, keys, merkle, packer
from p2pbackup.core.keys import Keyring
from p2pbackup.dht import invites
from p2pbackup.dht.records import RecordAddress
from p2pbackup.engine.index import Index, ShardShortfall
from p2pbackup.engine.progress import plural
from p2pbackup.engine.repository import Repository, open_store
from p2pbackup.engine.rootrecord import open_root_record
from p2pbackup.errors import (
    FormatError,
    HomeConflictError,
    IntegrityError,
    NotEnoughShardsError,
    P2PBackupError,
    PeerUnavailableError,
    StoreError,
    UsageError,
)
from p2pbackup.model import (
    NODE_ID_SIZE,
    PEER_KIND_DIR,
    PEER_KIND_NODE,
    BlobType,
    FriendRecord,
    PackRecord,
    PeerRecord,
    RepositoryConfig,
    RootRecord,
)
from p2pbackup.net.limits import BandwidthLimits, limited
from p2pbackup.net.network import Address, Network, TcpNetwork
from p2pbackup.stores.durable import write_private_file
from p2pbackup.stores.folder import init_folder_peer, read_folder_peer_id
from p2pbackup.stores.remote import Locator, RemoteShardStore
from p2pbackup.wire.session import Identity

if TYPE_CHECKING:
    from p2pbackup.maintenance.status import DataHealth, Hosting, KeptFor
    from p2pbackup.wire.relay import Route

log = logging.getLogger(__name__)

DEFAULT_K = 3
DEFAULT_N = 6
#: 12 MiB: large enough that per-pack costs (n files, n fsyncs) stay small,
#: small enough that two packs being coded and uploaded at once keep a
#: backup's peak memory under 300 MB.
DEFAULT_PACK_SIZE = 12 * 1024 * 1024
#: Seconds ``friend add`` waits for each address of a friend to answer: a
#: friend that is offline is still added, so a long wait buys nothing.
FRIEND_PROBE_TIMEOUT = 5.0
#: The fewest hex digits that may name a friend (``friend remove``), or
#: characters a peer (``peer remove``).
MIN_ID_PREFIX = 8

_T = TypeVar("_T")


def parse_shards(text: str) -> tuple[int, int]:
    """``"K/N"`` → (k, n), checked: 1 <= k < n <= 255."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise UsageError(f"--shards wants K/N such as 3/6, not {text!r}") from None
    if not 1 <= k < n <= 255:
        raise UsageError(f"--shards {text}: need 1 <= K < N <= 255")
    return k, n


def default_config(k: int = DEFAULT_K, n: int = DEFAULT_N) -> RepositoryConfig:
    params = chunker.DEFAULT_PARAMS
    return RepositoryConfig(
        k=k,
        n=n,
        pack_size=DEFAULT_PACK_SIZE,
        chunk_min=params.min_size,
        chunk_avg=params.avg_size,
        chunk_max=params.max_size,
        block_size=merkle.DEFAULT_BLOCK_SIZE,
    )


def init_home(
    home: Home,
    config: RepositoryConfig,
    *,
    deliver_key: Callable[[str], None] | None = None,
) -> str:
    """Create a new home with a fresh master secret; returns the recovery key text.

    ``deliver_key`` (e.g. writing it to a file) runs before the home counts as
    created: if it fails, the new home is removed again, so no home is ever left
    whose recovery key nobody has seen.
    """
    secret = keys.generate_master_secret()
    keyring = Keyring.from_master_secret(secret)
    key = keys.format_recovery_key(secret)
    kept = _entries(home.path)
    with home.locked():
        home.create(secret, keyring.node_id)
        try:
            index = Index(home.index_path)
            try:
                with index.transaction():
                    index.set_config(config)
            finally:
                index.close()
            if deliver_key is not None:
                deliver_key(key)
        except BaseException:
            _remove_home(home, kept=kept)
            raise
    return key


#: How a command holds the home (see :func:`open_repository`).
Access = Literal["read", "write", "remove"]


def _hold(home: Home, access: Access) -> contextlib.AbstractContextManager[None]:
    if access == "read":
        return home.reading()
    if access == "remove":
        return home.removing()
    return home.locked()


#: The network of the ``serve`` this code runs in (kept to its bandwidth
#: limits): the commands it runs for a client, and its scheduled backups,
#: go through it. None outside ``serve``.
SERVING_NETWORK: contextvars.ContextVar[Network | None] = contextvars.ContextVar(
    "p2pbackup_serving_network", default=None
)


def network_within(limits: BandwidthLimits) -> Network:
    """The network a command uses (the serving node's, else TCP), kept to
    ``limits`` besides."""
    base = SERVING_NETWORK.get()
    return limited(base if base is not None else TcpNetwork(), limits)


def _dht_locator(home: Home, network: Network) -> Locator:
    """The home's DHT locator (:func:`p2pbackup.app.homedht.dht_locator`),
    imported at its first lookup: the DHT brings kademlia and trio-asyncio,
    which a command that finds no node that moved (``snapshots``, a backup
    to folder peers) need not load."""
    found: list[Locator] = []

    async def locate(node_id: bytes) -> Sequence[Route]:
        if not found:
            from p2pbackup.app import homedht

            found.append(homedht.dht_locator(home, network))
        return await found[0](node_id)

    return locate


@contextlib.asynccontextmanager
async def open_repository(
    home: Home, *, network: Network | None = None, access: Access = "write"
) -> AsyncIterator[Repository]:
    """The home's repository, held for the duration: ``write`` (the
    default) alone among writers; ``read`` beside other readers and a writer
    that only adds, such as a backup (a reader still records what it learns
    of peers: when they answered, where they moved); ``remove`` alone among
    writers and readers (forget, prune)."""
    home.require()
    with _hold(home, access):
        keyring = Keyring.from_master_secret(home.load_secret())
        index = Index(home.index_path, create=False)
        if network is None:
            network = SERVING_NETWORK.get() or TcpNetwork()
        repo = Repository(keyring, index, network, locate=_dht_locator(home, network))
        repo.settings = functools.partial(home_settings, home)
        try:
            yield repo
        finally:
            try:
                await repo.aclose()
            finally:
                index.close()


async def add_folder_peer(repo: Repository, path: Path) -> PeerRecord:
    """Use a local folder (an external disk, a mounted share) as a peer."""
    path = path.absolute()
    if not path.is_dir():
        raise UsageError(f"peer folder {path} does not exist or is not a directory")
    peer_id = await trio.to_thread.run_sync(init_folder_peer, path)
    for peer in repo.peers():
        if peer.peer_id == peer_id or (peer.kind == PEER_KIND_DIR and Path(peer.location) == path):
            raise UsageError(f"{path} is already peer {peer.peer_id}")
    record = PeerRecord(peer_id=peer_id, kind=PEER_KIND_DIR, location=str(path))
    with repo.index.transaction():
        repo.index.add_peer(record)
    if repo.index.snapshots() or repo.index.pack_ids():
        await repo.publish_root()
    return record


def invite_nodes(code: str) -> list[tuple[str, str]]:
    """(address, node id) for each address of the node an invite code names,
    as ``recover`` takes storage nodes (``recover --friend``)."""
    invite = invites.decode_invite(code)
    return [(str(Address(a.host, a.port)), invite.node_id.hex()) for a in invite.addresses]


def parse_node_id(text: str) -> bytes:
    """A node id given by a user: 40 hex digits."""
    cleaned = text.strip().lower()
    if len(cleaned) != 2 * NODE_ID_SIZE or any(c not in "0123456789abcdef" for c in cleaned):
        raise UsageError(
            f"{text!r} is not a node id (expected {2 * NODE_ID_SIZE} hex digits, "
            "as `p2pbackup id` prints them)"
        )
    return bytes.fromhex(cleaned)


async def add_node_peer(repo: Repository, address_text: str, node_id_text: str) -> PeerRecord:
    """Use a storage node on the network as a peer, after checking that it answers as itself."""
    address = Address.parse(address_text, allow_port_zero=False)
    node_id = parse_node_id(node_id_text)
    if node_id == repo.keyring.node_id:
        raise UsageError("that node id is this home's own; a peer must be another node")
    peer_id = node_id.hex()
    record = PeerRecord(peer_id=peer_id, kind=PEER_KIND_NODE, location=str(address))
    for peer in repo.peers():
        if peer.peer_id == peer_id:
            raise UsageError(f"node {peer_id} is already a peer (at {peer.location})")
    store = open_store(record, repo.keyring, repo.network)
    try:
        await store.usage()  # reachable, and the node proved its id in the handshake
    finally:
        await store.aclose()
    with repo.index.transaction():
        repo.index.add_peer(record)
    if repo.index.snapshots() or repo.index.pack_ids():
        await repo.publish_root()
    return record


# -- friends ---------------------------------------------------------------------------


def _invite_address(text: str) -> RecordAddress:
    address = Address.parse(text, allow_port_zero=False)
    try:
        record_address = RecordAddress.from_host_port(address.host, address.port)
    except FormatError as exc:
        detail = str(exc).removeprefix("DHT record: ")
        raise UsageError(f"address {text!r} cannot go into an invite: {detail}") from None
    if _is_unspecified(record_address.host):
        raise UsageError(
            f"address {text!r} means 'every interface' here; a friend needs an address "
            "that reaches this machine (its public IP address or host name)"
        )
    return record_address


def _is_unspecified(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def hosting(home: Home) -> Hosting:
    """What ``status`` reports of this home as a node."""
    from p2pbackup.maintenance.status import Hosting
    from p2pbackup.node import shardhost
    from p2pbackup.node.schedule import RUNNING_OFFER, load_config

    # What the running node was started with, if status runs in it; else
    # what config.toml says a node would start with.
    offer = RUNNING_OFFER.get() or load_config(home.config_path).storage
    return Hosting(
        addresses=tuple(home.read_addresses()),
        by_owner=shardhost.usage_by_owner(home.hosted_path),
        capacity=offer.capacity,
        per_friend=offer.per_friend,
        kept_for=tuple(_kept_for(home)),
    )


def _kept_for(home: Home) -> Iterator[KeptFor]:
    """The homes this one is a delegate of, from the grants its node holds
    (one that no longer opens is left out: the next grant replaces it)."""
    from p2pbackup.maintenance.status import KeptFor
    from p2pbackup.node import shardhost

    for held in shardhost.read_held_grants(home.hosted_path):
        try:
            grant = delegation.open_grant(held.grant, owner=held.owner)
            certificate = delegation.open_certificate(held.certificate)
        except IntegrityError:
            continue
        acted_at, health = _last_pass(home, held.owner)
        yield KeptFor(
            owner=held.owner.hex(),
            grant_sequence=held.sequence,
            received_at=held.received_at,
            packs=len(grant.packs),
            expiry=certificate.expiry,
            acted_at=acted_at,
            health=health,
        )


def _last_pass(home: Home, owner: bytes) -> tuple[int | None, DataHealth | None]:
    """When this home's last delegated pass for ``owner`` began, and the
    health of the owner's packs it found (None, None: no pass yet)."""
    from p2pbackup.maintenance import delegated
    from p2pbackup.maintenance.status import kept_health

    path = delegated.grant_index_path(home.path, owner)
    if not path.exists():
        return None, None
    index = Index(path, create=False)
    try:
        raw = index.get_meta(delegated.LAST_PASS)
        if raw is None:
            return None, None
        since = int(raw)
        return since, kept_health(index, since)
    finally:
        index.close()


def make_invite(home: Home, addresses: Sequence[str] = ()) -> str:
    """This home's invite code: its identity key and where to reach it.

    ``addresses`` (``HOST:PORT``) if given, else those ``serve`` last wrote to
    the home; :class:`UsageError` if there are none.
    """
    home.require()
    keyring = Keyring.from_master_secret(home.load_secret())
    if addresses:
        chosen = list(dict.fromkeys(_invite_address(text) for text in addresses))
        if len(chosen) > invites.MAX_ADDRESSES:
            raise UsageError(
                f"an invite carries at most {invites.MAX_ADDRESSES} addresses; {len(chosen)} given"
            )
    else:
        chosen = []
        for text in home.read_addresses():
            try:
                address = _invite_address(text)
            except UsageError:
                continue  # e.g. the wildcard a node listens on; a friend cannot dial it
            if address not in chosen:
                chosen.append(address)
        del chosen[invites.MAX_ADDRESSES :]
    if not chosen:
        raise UsageError(
            "this home has no known address: start `p2pbackup serve` first, "
            "or pass --address HOST:PORT"
        )
    return invites.encode_invite(invites.invite_for(keyring.identity_public, chosen))


@attrs.frozen
class FriendAdded:
    """What :func:`add_friend` did: the friend and its peer row, whether it
    answered now, and warnings for the user."""

    friend: FriendRecord
    peer: PeerRecord
    reached: bool
    warnings: tuple[str, ...]


async def add_friend(
    repo: Repository, code: str, *, now: Callable[[], float] = time.time
) -> FriendAdded:
    """Add the node an invite code names as a friend, and as a node peer."""
    invite = invites.decode_invite(code)
    node_id = invite.node_id
    peer_id = node_id.hex()
    if node_id == repo.keyring.node_id:
        raise UsageError("that is this home's own invite code; give it to a friend, and add theirs")
    existing = repo.index.friend(node_id)
    if existing is not None:
        raise UsageError(
            f"node {peer_id} is already a friend (at {', '.join(existing.addresses)}); "
            "see `p2pbackup friend list`"
        )
    texts = tuple(str(Address(a.host, a.port)) for a in invite.addresses)
    reached, problems = await _probe(repo, node_id, texts)
    warnings = []
    if reached is None:
        warnings.append(
            f"node {peer_id} could not be reached now ({'; '.join(problems)}); it is added "
            "anyway, and used once it answers and proves the key in its invite code"
        )
    peer = next((p for p in repo.peers() if p.peer_id == peer_id), None)
    new_peer = peer is None
    if peer is None:
        peer = PeerRecord(peer_id, PEER_KIND_NODE, reached or texts[0])
    friend = FriendRecord(node_id, invite.public_key, texts, int(now()))
    with repo.index.transaction():
        repo.index.add_friend(friend)
        if new_peer:
            repo.index.add_peer(peer)
    if new_peer and (repo.index.snapshots() or repo.index.pack_ids()):
        warnings.extend(await publish_root_or_warn(repo))
    return FriendAdded(friend, peer, reached is not None, tuple(warnings))


async def _probe(
    repo: Repository, node_id: bytes, addresses: Sequence[str]
) -> tuple[str | None, list[str]]:
    """The first address where ``node_id`` answers and proves its key, and
    what went wrong at the others."""
    problems = []
    identity = Identity.from_keyring(repo.keyring)
    for text in addresses:
        store = RemoteShardStore(
            repo.network,
            identity,
            Address.parse(text),
            node_id,
            connect_timeout=FRIEND_PROBE_TIMEOUT,
            io_timeout=FRIEND_PROBE_TIMEOUT,
        )
        try:
            await store.usage()
        except StoreError as exc:
            problems.append(str(exc))
            continue
        finally:
            await store.aclose()
        return text, problems
    return None, problems


async def publish_root_or_warn(repo: Repository) -> list[str]:
    """Tell the peers the new peer (or delegate) list; a warning instead of
    an error, since what was asked for is done and the next backup publishes
    again."""
    try:
        await repo.publish_root()
    except StoreError as exc:
        return [f"the root record could not be updated on the peers now ({exc})"]
    return []


@attrs.frozen
class FriendStatus:
    """A friend as ``friend list`` shows it: where its peer row says it is and
    how many shards of this home the index places on it."""

    friend: FriendRecord
    location: str | None
    shards: int


def friends(repo: Repository) -> list[FriendStatus]:
    """Every friend, oldest first."""
    counts = repo.index.shard_count_by_peer()
    locations = {p.peer_id: p.location for p in repo.peers()}
    return [
        FriendStatus(f, locations.get(f.node_id.hex()), counts.get(f.node_id.hex(), 0))
        for f in repo.index.friends()
    ]


#: The longest name a peer may be given.
MAX_NAME = formats.MAX_PEER_NAME
_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def check_name(name: str) -> str:
    """``name`` as a peer's name (lower case), or UsageError saying why not:
    1 to :data:`MAX_NAME` letters, digits, ``-``, ``_`` or ``.``, and not all
    hex digits, so that a name is never read as an id."""
    cleaned = name.strip().lower()
    if not cleaned or len(cleaned) > MAX_NAME:
        raise UsageError(f"a name has 1 to {MAX_NAME} characters, not {len(cleaned)}: {name!r}")
    if not set(cleaned) <= _NAME_CHARACTERS:
        raise UsageError(f"{name!r}: a name has letters, digits, '-', '_' and '.' only")
    if set(cleaned) <= set("0123456789abcdef"):
        raise UsageError(f"{name!r} reads as a node id: give a name with another letter in it")
    return cleaned


def name_peer(repo: Repository, peer_id: str, name: str | None) -> None:
    """Give ``peer_id`` the name ``name`` (None: none), refusing one another
    peer has."""
    if name is not None:
        name = check_name(name)
        holder = next((p for p, n in repo.index.peer_names().items() if n == name), None)
        if holder is not None and holder != peer_id:
            raise UsageError(f"peer {holder} is named {name} already: pick another name")
    with repo.index.transaction():
        repo.index.set_peer_name(peer_id, name)


def _named(repo: Repository, id_text: str) -> str | None:
    """The peer id of the peer named ``id_text``, if one is."""
    wanted = id_text.strip().lower()
    return next((p for p, n in repo.index.peer_names().items() if n == wanted), None)


def find_friend(repo: Repository, id_text: str) -> FriendRecord:
    """The friend named by its name, a full node id or a unique prefix of at
    least :data:`MIN_ID_PREFIX` hex digits."""
    named = _named(repo, id_text)
    if named is not None:
        friend = repo.index.friend(bytes.fromhex(named)) if len(named) == 40 else None
        if friend is not None:
            return friend
    wanted = id_text.strip().lower()
    if any(c not in "0123456789abcdef" for c in wanted) or not wanted:
        raise UsageError(f"{id_text!r} is not a node id (hex digits, as `friend list` shows)")
    if len(wanted) > 2 * NODE_ID_SIZE:
        raise UsageError(f"{id_text!r} is longer than a node id ({2 * NODE_ID_SIZE} hex digits)")
    if len(wanted) < MIN_ID_PREFIX:
        raise UsageError(
            f"{id_text!r} is too short to name a friend: give at least {MIN_ID_PREFIX} "
            "hex digits of its node id"
        )
    friends = {f.node_id.hex(): f for f in repo.index.friends()}
    return _by_prefix(friends, wanted, "friend", "a node id")


def find_peer(repo: Repository, id_text: str) -> PeerRecord:
    """The peer named by its name, its full id or a unique prefix of at
    least :data:`MIN_ID_PREFIX` characters."""
    named = _named(repo, id_text)
    if named is not None:
        peer = next((p for p in repo.peers() if p.peer_id == named), None)
        if peer is not None:
            return peer
    wanted = id_text.strip().lower()
    if len(wanted) < MIN_ID_PREFIX:
        raise UsageError(
            f"{id_text!r} is too short to name a peer: give at least {MIN_ID_PREFIX} "
            "characters of its id (see `peer list`)"
        )
    return _by_prefix({p.peer_id.lower(): p for p in repo.peers()}, wanted, "peer", "an id")


def _by_prefix(named: Mapping[str, _T], wanted: str, noun: str, id_name: str) -> _T:
    """The one value whose name starts with ``wanted``; UsageError naming
    none or all of them (``noun``: friend or peer, listed by `NOUN list`)."""
    matches = [name for name in named if name.startswith(wanted)]
    if not matches:
        raise UsageError(f"no {noun} has {id_name} starting with {wanted} (see `{noun} list`)")
    if len(matches) > 1:
        names = ", ".join(matches)
        raise UsageError(f"{wanted} could be any of {len(matches)} {noun}s ({names}); type more")
    return named[matches[0]]


@attrs.frozen(kw_only=True)
class PeerRemoved:
    """What :func:`remove_peer` did."""

    peer_id: str
    #: Its shards rebuilt on other peers first, and those it was asked to delete.
    shards_rebuilt: int
    shards_deleted: int
    #: Shard rows forgotten with the peer (non-zero only with ``force``).
    shards_forgotten: int
    #: Packs short of shards afterwards (all packs, not only this peer's).
    shortfall: ShardShortfall
    warnings: tuple[str, ...]


@attrs.frozen(kw_only=True)
class FriendRemoved(PeerRemoved):
    """What :func:`remove_friend` did."""

    friend: FriendRecord


async def _evacuate_and_forget(
    repo: Repository, peer_id: str, *, force: bool, friend: bytes | None = None
) -> PeerRemoved:
    """Take a peer out of the repository: its shards count as lost at once
    and are rebuilt on the other peers now (a repair pass over its packs,
    without reading from it), it is asked to delete those rebuilt, and then
    it is forgotten, with ``friend``'s friend row if given.

    Refused (UsageError, nothing forgotten) while it still holds shards no
    other peer could take, unless ``force``: those are forgotten, not
    deleted, since they may be the last copies.
    """
    from p2pbackup.maintenance import repairer

    held = repo.index.shard_count_by_peer().get(peer_id, 0)
    rebuilt = deleted = 0
    warnings: list[str] = []
    if held:
        report = await repairer.evacuate(repo, peer_id)
        rebuilt, deleted = report.shards_rebuilt, report.shards_deleted
        warnings.extend(report.problems)
        held = repo.index.shard_count_by_peer().get(peer_id, 0)
    if held and not force:
        raise UsageError(
            f"node {peer_id} holds {plural(held, 'shard')} of this home's packs; "
            f"`friend remove --force {peer_id}` forgets them, leaving those packs less redundant"
            if friend is not None
            else f"peer {peer_id} holds {plural(held, 'shard')} of this home's packs "
            f"that no other peer could take; `peer remove --force {peer_id}` forgets them, "
            "leaving those packs less redundant"
        )
    had_peer = any(p.peer_id == peer_id for p in repo.peers())
    with repo.index.transaction():
        if friend is not None:
            repo.index.remove_friend(friend)
        forgotten = repo.index.remove_peer(peer_id)
    if had_peer and repo.peers() and (repo.index.snapshots() or repo.index.pack_ids()):
        warnings.extend(await publish_root_or_warn(repo))
    return PeerRemoved(
        peer_id=peer_id,
        shards_rebuilt=rebuilt,
        shards_deleted=deleted,
        shards_forgotten=forgotten,
        shortfall=repo.index.shard_shortfall(),
        warnings=tuple(warnings),
    )


async def remove_friend(repo: Repository, id_text: str, *, force: bool = False) -> FriendRemoved:
    """Forget a friend and its peer row, once its shards are rebuilt on
    other peers (:func:`_evacuate_and_forget`)."""
    friend = find_friend(repo, id_text)
    done = await _evacuate_and_forget(
        repo, friend.node_id.hex(), force=force, friend=friend.node_id
    )
    return FriendRemoved(friend=friend, **attrs.asdict(done, recurse=False))


async def remove_peer(repo: Repository, id_text: str, *, force: bool = False) -> PeerRemoved:
    """Forget a peer that is not a friend, once its shards are rebuilt on
    other peers (:func:`_evacuate_and_forget`)."""
    peer = find_peer(repo, id_text)
    if peer.kind == PEER_KIND_NODE and repo.index.friend(bytes.fromhex(peer.peer_id)):
        raise UsageError(
            f"node {peer.peer_id} is a friend: `p2pbackup friend remove {peer.peer_id}` "
            "forgets it as a friend and as a peer"
        )
    return await _evacuate_and_forget(repo, peer.peer_id, force=force)


@attrs.define
class RecoverSummary:
    node_id: str = ""
    root_sequence: int = 0
    peers_known: int = 0
    peers_reached: int = 0
    snapshots: int = 0
    packs: int = 0
    packs_restorable: int = 0
    #: The sequence number of the root record this home wrote as it took
    #: over from the home that wrote the one found (0: it wrote none).
    took_over: int = 0
    #: What the restored config.toml sets up ("": none was carried).
    settings: str = ""
    #: Shard locations taken from the delegates' repair logs: where they
    #: rebuilt shards while the home was away.
    delegated_moves: int = 0
    problems: list[str] = attrs.Factory(list)

    def lines(self) -> list[str]:
        lines = [
            f"node {self.node_id}: root record #{self.root_sequence} found",
            f"peers: {self.peers_reached} of {self.peers_known} reachable",
            f"snapshots: {self.snapshots}; packs: {self.packs_restorable} of {self.packs} "
            "have enough shards to restore",
        ]
        if self.settings:
            lines.append(f"config.toml restored: {self.settings}")
        if self.delegated_moves:
            lines.append(
                f"took {self.delegated_moves} shard locations from the delegates' repair logs"
            )
        if self.took_over:
            lines.append(
                f"this home now writes the root record (#{self.took_over}); the home that "
                f"wrote #{self.root_sequence}, if still in use, refuses to back up until "
                "`p2pbackup backup --takeover` there"
            )
        lines.extend(f"problem: {p}" for p in self.problems)
        return lines


async def _reach_peers(
    peer_dirs: list[Path], peer_nodes: list[tuple[str, str]], problems: list[str]
) -> list[PeerRecord]:
    """The given peers as they are reached now (a folder may have moved, a node
    changed address). Folders are read for their peer id; nodes prove theirs
    in the handshake."""
    peers = []
    for path in peer_dirs:
        path = path.absolute()
        try:
            peer_id = await trio.to_thread.run_sync(read_folder_peer_id, path)
        except StoreError as exc:
            problems.append(f"{path}: {exc}")
            continue
        peers.append(PeerRecord(peer_id, PEER_KIND_DIR, str(path)))
    for address_text, node_id_text in peer_nodes:
        address = Address.parse(address_text, allow_port_zero=False)
        node_id = parse_node_id(node_id_text)
        peers.append(PeerRecord(node_id.hex(), PEER_KIND_NODE, str(address)))
    return peers


async def _find_root(
    keyring: Keyring, peers: list[PeerRecord], network: Network, problems: list[str]
) -> tuple[RootRecord, dict[str, PeerRecord]]:
    """The newest root record on the given peers, and which of them answered."""
    best: RootRecord | None = None
    found: dict[str, PeerRecord] = {}
    for peer in peers:
        where = peer.location
        store = open_store(peer, keyring, network)
        try:
            raw = await store.get_root()
        except StoreError as exc:
            problems.append(f"{where}: {exc}")
            continue
        finally:
            await store.aclose()
        found[peer.peer_id] = peer
        if raw is None:
            problems.append(f"{where}: holds no root record for this recovery key")
            continue
        try:
            record = open_root_record(keyring, raw)
        except IntegrityError as exc:
            problems.append(f"{where}: its root record does not verify ({exc})")
            continue
        if best is None or record.sequence > best.sequence:
            best = record
    if best is None:
        raise UsageError(
            "no root record for this recovery key on the given peers "
            f"({'; '.join(problems) or 'no peers given'}); "
            "check the recovery key and the peers"
        )
    return best, found


async def _root_holders_in_dht(
    home: Home,
    keyring: Keyring,
    bootstrap: Sequence[Address],
    network: Network,
    problems: list[str],
    clock: Callable[[], float] = time.time,
) -> list[tuple[str, str]]:
    """(address, node id) of every node that answers at an address of the
    home's root pointer; what went wrong goes to ``problems``."""
    from p2pbackup.app import homedht
    from p2pbackup.dht import discovery

    try:
        pointer = await discovery.lookup_root_pointer(
            homedht.remembered(home),
            keyring.node_id,
            bootstrap=bootstrap,
            network=network,
            wall_clock=clock,
        )
    except P2PBackupError as exc:
        problems.append(f"the DHT: {exc}")
        return []
    if pointer is None:
        days = discovery.DEFAULT_ROOT_POINTER_LIFETIME // 86400
        problems.append(
            f"the DHT holds no root pointer for node {keyring.node_id.hex()} (a pointer "
            f"lives {days} days after the node last ran; use --friend INVITE_CODE)"
        )
        return []
    identity = Identity.from_keyring(keyring)
    found: list[tuple[str, str]] = []

    async def ask(holder: RecordAddress) -> None:
        address = Address(holder.host, holder.port)
        try:
            node_id = await discovery.node_at(network, identity, address)
        except PeerUnavailableError as exc:
            problems.append(f"root pointer: {exc}")
            return
        found.append((str(address), node_id.hex()))

    async with trio.open_nursery() as nursery:
        for holder in pointer.addresses:
            nursery.start_soon(ask, holder)
    return found


async def recover(
    home: Home,
    recovery_key: str,
    peer_dirs: list[Path],
    peer_nodes: list[tuple[str, str]] | None = None,
    *,
    bootstrap: Sequence[Address] = (),
    network: Network | None = None,
    partial: bool = False,
    clock: Callable[[], float] = time.time,
) -> RecoverSummary:
    """Rebuild a home from its recovery key and any reachable peer: folders
    (paths), storage nodes (address and node id), or the nodes the home's
    root pointer names, found in the DHT joined through ``bootstrap``
    (``clock``, unix seconds, judges the age of the records found there)."""
    secret = keys.parse_recovery_key(recovery_key)
    keyring = Keyring.from_master_secret(secret)
    if home.exists():
        raise UsageError(f"{home.path} is already a p2pbackup home; recover into a new one")
    network = network if network is not None else TcpNetwork()
    summary = RecoverSummary(node_id=keyring.node_id.hex())
    peer_nodes = list(peer_nodes or [])
    if bootstrap:
        peer_nodes.extend(
            await _root_holders_in_dht(home, keyring, bootstrap, network, summary.problems, clock)
        )
    peers = await _reach_peers(peer_dirs, peer_nodes, summary.problems)
    root, found = await _find_root(keyring, peers, network, summary.problems)
    kept = _entries(home.path)
    home.create(secret, keyring.node_id)
    try:
        with home.locked():
            _restore_settings(home, root, summary)
            index = Index(home.index_path)
            try:
                repo = Repository(keyring, index, network)
                repo.settings = functools.partial(home_settings, home)
                try:
                    await _rebuild_index(repo, root, found, summary, partial=partial)
                finally:
                    await repo.aclose()
            finally:
                index.close()
    except BaseException:
        # A half-rebuilt home would look initialised; leave none behind.
        _remove_home(home, kept=kept)
        raise
    return summary


def home_settings(home: Home) -> bytes:
    """The home's ``config.toml``, for the root record to carry (empty when
    there is none, or when it is too large to carry: said in the log)."""
    try:
        text = home.config_path.read_bytes()
    except FileNotFoundError:
        return b""
    if len(text) > formats.MAX_ROOT_SETTINGS:
        log.warning(
            "%s is over %d bytes: the root record does not carry it, and `recover` "
            "will not bring it back",
            home.config_path,
            formats.MAX_ROOT_SETTINGS,
        )
        return b""
    return text


def _restore_settings(home: Home, root: RootRecord, summary: RecoverSummary) -> None:
    """Write back the ``config.toml`` the root record carries (0600: it may
    hold an SMTP password or a webhook token), and say what it sets up."""
    from p2pbackup.node.schedule import load_config

    if not root.settings:
        return
    write_private_file(home.config_path, root.settings)
    try:
        config = load_config(home.config_path)
    except P2PBackupError as error:
        summary.problems.append(f"config.toml restored, but it does not read: {error}")
        return
    summary.settings = (
        config.backup.describe()
        if config.backup is not None
        else "no scheduled backups (config.toml has no [backup] table)"
    )


def _merge_pack(index: Index, record: PackRecord) -> None:
    """Add a pack record read from an index segment. A repair that moved
    shards describes the pack again in a later segment, and segments come
    in no particular order: where two disagree on a shard's peer, the first
    stays current and the other is kept as a displaced copy, for
    :func:`_prefer_listed` to settle."""
    known = index.pack(record.pack_id, with_blobs=False)
    if known is None:
        index.add_pack(record, in_segment=True)
        return
    current = {location.index: location for location in known.shards}
    for location in record.shards:
        have = current.get(location.index)
        if have is None:
            index.set_shard(record.pack_id, location)
        elif have.peer_id != location.peer_id:
            index.add_displaced(record.pack_id, location, 0)


def _prefer_listed(index: Index, held: Mapping[str, frozenset[bytes]]) -> None:
    """Where a displaced copy's peer lists the shard and the current copy's
    peer does not, the displaced copy becomes current (the other displaced)."""
    for pack_id, copies in index.displaced().items():
        record = index.pack(pack_id, with_blobs=False)
        assert record is not None
        current = {location.index: location for location in record.shards}
        for copy in copies:
            location = copy.location
            shard = formats.shard_id(pack_id, location.index)
            now = current.get(location.index)
            if shard not in held.get(location.peer_id, ()):
                continue
            if now is not None and shard in held.get(now.peer_id, ()):
                continue
            index.forget_displaced(pack_id, location.index, location.peer_id)
            if now is not None:
                index.add_displaced(pack_id, now, copy.displaced_at)
            index.set_shard(pack_id, location)
            current[location.index] = location


async def _read_delegates(repo: Repository, summary: RecoverSummary, *, quiet: bool = False) -> int:
    """Take the delegates' repair logs into the index being rebuilt: how
    many shard locations moved. Each delegate that gave none is a problem
    (said once: not again when ``quiet``)."""
    from p2pbackup.maintenance import grants

    if not repo.index.delegates():
        return 0
    taken, warnings = await grants.read_back(repo)
    if not quiet:
        summary.problems.extend(warnings)
    return taken


def _entries(path: Path) -> frozenset[str] | None:
    """The names in a directory; None when there is no directory."""
    try:
        return frozenset(entry.name for entry in path.iterdir())
    except FileNotFoundError:
        return None


def _remove_home(home: Home, *, kept: frozenset[str] | None) -> None:
    """Take back what a failed init or recover made: every entry of the home
    but ``kept`` (those there before it began), and the directory itself
    when there was none (``kept`` None). The home was checked empty but for
    its lock file first, so nothing of the user's goes."""
    for entry in _entries(home.path) or ():
        if kept is not None and entry in kept:
            continue
        path = home.path / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if kept is None:
        with contextlib.suppress(OSError):
            home.path.rmdir()


async def _rebuild_index(
    repo: Repository,
    root: RootRecord,
    found: dict[str, PeerRecord],
    summary: RecoverSummary,
    *,
    partial: bool = False,
) -> None:
    index = repo.index
    with index.transaction():
        index.set_config(root.config)
        for peer in root.peers:
            # Where the user just reached it wins over where it last was.
            now = found.get(peer.peer_id)
            index.add_peer(now if now is not None and now.kind == peer.kind else peer)
        for friend in root.friends:
            if index.friend(friend.node_id) is None:
                index.add_friend(friend)
        for peer_id, name in root.names:
            index.set_peer_name(peer_id, name)
        for record in root.index_packs:
            index.add_pack(record, is_index=True, in_segment=True)
        added = int(time.time())
        for node_id in root.delegates:
            index.add_delegate(node_id, added)
        # The record taken over: its writer's later ones are foreign, ours not.
        index.set_root(root.sequence, root.instance)
    summary.root_sequence = root.sequence
    summary.peers_known = len(root.peers)
    # While the home was away its delegates may have rebuilt the index
    # packs' shards elsewhere: where, first; the data packs' once the
    # segments name them.
    summary.delegated_moves += await _read_delegates(repo, summary)

    unread = 0
    for listed_record in root.index_packs:
        # Where its shards are now: the delegates may have moved some.
        record = index.pack(listed_record.pack_id) or listed_record
        try:
            data = await repo.read_pack(record, use_cache=False)
            header = packer.read_pack_header(repo.keyring.data_key, data)
        except (NotEnoughShardsError, IntegrityError) as exc:
            summary.problems.append(f"index pack {record.pack_id.hex()[:16]}: {exc}")
            unread += 1
            continue
        for entry in header.entries:
            if entry.type != BlobType.INDEX:
                continue
            plain = await repo.load_blob(entry.blob_id, BlobType.INDEX)
            segment = formats.decode_index_segment(plain)
            with index.transaction():
                for listed in segment.packs:
                    _merge_pack(index, listed)
    summary.delegated_moves += await _read_delegates(repo, summary, quiet=True)

    for snapshot_id in root.snapshots:
        try:
            plain = await repo.load_blob(snapshot_id, BlobType.SNAPSHOT)
        except (NotEnoughShardsError, IntegrityError) as exc:
            summary.problems.append(f"snapshot {snapshot_id.hex()[:12]}: {exc}")
            unread += 1
            continue
        with index.transaction():
            index.add_snapshot(snapshot_id, formats.decode_snapshot(plain))
        summary.snapshots += 1

    peers = index.peers()
    held, unreached = await repo.list_held(p.peer_id for p in peers)
    summary.problems.extend(
        f"peer {p.peer_id} ({p.location}): {unreached[p.peer_id]}"
        for p in peers
        if p.peer_id in unreached
    )
    summary.peers_reached = reached = len(held)
    with index.transaction():
        _prefer_listed(index, held)
    for k, _n, holders in repo.live_holders(held):
        summary.packs += 1
        if len(holders) >= k:
            summary.packs_restorable += 1
    if unread and not partial:
        # Taking over now would write a root record without what could not
        # be read, on every peer: a recovery made while the friends holding
        # the index sleep would lose every snapshot for good.
        raise UsageError(
            f"could not read {plural(unread, 'index pack or snapshot', 'index packs or snapshots')}"
            f" of the {len(root.index_packs) + len(root.snapshots)} the root record names "
            f"({'; '.join(summary.problems[:3])}); nothing was written and no peer was "
            "changed: recover again when more peers are online, or with --partial to take "
            "what can be read now"
        )
    if reached:
        # Tell every peer where the others are now (a folder may have moved);
        # from now on this home is the one that writes the root record.
        try:
            await repo.publish_root()
        except HomeConflictError as exc:
            raise UsageError(
                f"peer {exc.peer_id} holds a newer root record (#{exc.sequence}) than the "
                f"#{root.sequence} found; recover again, naming that peer too"
            ) from None
        summary.took_over = index.root_sequence()
