"""User-level operations on a home: init, open, add a peer, recover.

This is the composition root of the backup engine: it turns a home directory
into a :class:`~p2pbackup.repository.Repository` (keyring, index, peers) and
holds the home's lock while anything writes to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import trio

from p2pbackup import chunker, formats, keys, merkle, packer
from p2pbackup.errors import (
    IntegrityError,
    NotEnoughShardsError,
    StoreError,
    UsageError,
)
from p2pbackup.home import Home
from p2pbackup.index import Index
from p2pbackup.keys import Keyring
from p2pbackup.model import NODE_ID_SIZE, BlobType, PeerRecord, RepositoryConfig, RootRecord
from p2pbackup.net import Address, Network, TcpNetwork
from p2pbackup.repository import (
    PEER_KIND_DIR,
    PEER_KIND_NODE,
    Repository,
    open_root_record,
    open_store,
)
from p2pbackup.storage import init_folder_peer, read_folder_peer_id

DEFAULT_K = 3
DEFAULT_N = 6
#: 12 MiB: large enough that per-pack costs (n files, n fsyncs) stay small,
#: small enough that two packs being coded and uploaded at once keep a
#: backup's peak memory under 300 MB.
DEFAULT_PACK_SIZE = 12 * 1024 * 1024


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
    existed = home.path.exists()
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
            _remove_home(home, keep_dir=existed)
            raise
    return key


@contextlib.asynccontextmanager
async def open_repository(
    home: Home, *, network: Network | None = None
) -> AsyncIterator[Repository]:
    """The home's repository, locked for the duration."""
    home.require()
    with home.locked():
        keyring = Keyring.from_master_secret(home.load_secret())
        index = Index(home.index_path)
        repo = Repository(keyring, index, network)
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
        if peer.peer_id == peer_id or (peer.kind == "dir" and Path(peer.location) == path):
            raise UsageError(f"{path} is already peer {peer.peer_id}")
    record = PeerRecord(peer_id=peer_id, kind="dir", location=str(path))
    with repo.index.transaction():
        repo.index.add_peer(record)
    if repo.index.snapshots() or repo.index.pack_ids():
        await repo.publish_root()
    return record


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


@attrs.define
class RecoverSummary:
    node_id: str = ""
    root_sequence: int = 0
    peers_known: int = 0
    peers_reached: int = 0
    snapshots: int = 0
    packs: int = 0
    packs_restorable: int = 0
    problems: list[str] = attrs.Factory(list)

    def lines(self) -> list[str]:
        lines = [
            f"node {self.node_id}: root record #{self.root_sequence} found",
            f"peers: {self.peers_reached} of {self.peers_known} reachable",
            f"snapshots: {self.snapshots}; packs: {self.packs_restorable} of {self.packs} "
            "have enough shards to restore",
        ]
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


async def recover(
    home: Home,
    recovery_key: str,
    peer_dirs: list[Path],
    peer_nodes: list[tuple[str, str]] | None = None,
    *,
    network: Network | None = None,
) -> RecoverSummary:
    """Rebuild a home from its recovery key and any reachable peer: folders
    (paths) or storage nodes (address and node id)."""
    secret = keys.parse_recovery_key(recovery_key)
    keyring = Keyring.from_master_secret(secret)
    if home.exists():
        raise UsageError(f"{home.path} is already a p2pbackup home; recover into a new one")
    network = network if network is not None else TcpNetwork()
    summary = RecoverSummary(node_id=keyring.node_id.hex())
    peers = await _reach_peers(peer_dirs, peer_nodes or [], summary.problems)
    root, found = await _find_root(keyring, peers, network, summary.problems)
    existed = home.path.exists()
    home.create(secret, keyring.node_id)
    try:
        with home.locked():
            index = Index(home.index_path)
            try:
                repo = Repository(keyring, index, network)
                try:
                    await _rebuild_index(repo, root, found, summary)
                finally:
                    await repo.aclose()
            finally:
                index.close()
    except BaseException:
        # A half-rebuilt home would look initialised; leave none behind.
        _remove_home(home, keep_dir=existed)
        raise
    return summary


def _remove_home(home: Home, *, keep_dir: bool) -> None:
    for path in (home.marker_path, home.secret_path, home.lock_path):
        path.unlink(missing_ok=True)
    for path in home.path.glob("index.sqlite*"):
        path.unlink(missing_ok=True)
    if not keep_dir:
        with contextlib.suppress(OSError):
            home.path.rmdir()


async def _rebuild_index(
    repo: Repository, root: RootRecord, found: dict[str, PeerRecord], summary: RecoverSummary
) -> None:
    index = repo.index
    with index.transaction():
        index.set_config(root.config)
        for peer in root.peers:
            # Where the user just reached it wins over where it last was.
            now = found.get(peer.peer_id)
            index.add_peer(now if now is not None and now.kind == peer.kind else peer)
        for record in root.index_packs:
            index.add_pack(record, is_index=True, in_segment=True)
        index.set_root_sequence(root.sequence)
    summary.root_sequence = root.sequence
    summary.peers_known = len(root.peers)

    for record in root.index_packs:
        try:
            data = await repo.read_pack(record, use_cache=False)
            header = packer.read_pack_header(repo.keyring.data_key, data)
        except (NotEnoughShardsError, IntegrityError) as exc:
            summary.problems.append(f"index pack {record.pack_id.hex()[:16]}: {exc}")
            continue
        for entry in header.entries:
            if entry.type != BlobType.INDEX:
                continue
            plain = await repo.load_blob(entry.blob_id, BlobType.INDEX)
            segment = formats.decode_index_segment(plain)
            with index.transaction():
                for listed in segment.packs:
                    index.add_pack(listed, in_segment=True)

    for snapshot_id in root.snapshots:
        try:
            plain = await repo.load_blob(snapshot_id, BlobType.SNAPSHOT)
        except (NotEnoughShardsError, IntegrityError) as exc:
            summary.problems.append(f"snapshot {snapshot_id.hex()[:12]}: {exc}")
            continue
        with index.transaction():
            index.add_snapshot(snapshot_id, formats.decode_snapshot(plain))
        summary.snapshots += 1

    reached = 0
    for peer in index.peers():
        try:
            await repo.store(peer.peer_id).list()
            reached += 1
        except (StoreError, UsageError) as exc:
            summary.problems.append(f"peer {peer.peer_id} ({peer.location}): {exc}")
    summary.peers_reached = reached
    for pack_id in index.pack_ids():
        pack = index.pack(pack_id, with_blobs=False)
        assert pack is not None
        summary.packs += 1
        present = 0
        for location in pack.shards:
            try:
                if await repo.store(location.peer_id).has(
                    formats.shard_id(pack_id, location.index)
                ):
                    present += 1
            except (StoreError, UsageError):
                continue
        if present >= pack.k:
            summary.packs_restorable += 1
    if reached:
        # Tell every peer where the others are now (a folder may have moved).
        await repo.publish_root()
