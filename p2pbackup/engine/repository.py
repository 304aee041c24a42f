"""The repository: one owner's packs on its peers, and the index that finds them.

Nouns:

* **repository** — the keyring, the local index and the peers' shard stores of
  one home, and the operations that move packs between them.
* **root record** — what a new home needs to find everything again; written to
  every peer after each change, inside a **signed envelope**: the payload is
  sealed with the record key and the envelope signed by the identity key.

Writing a pack: finish it, erasure-code it into n shards, put each shard on a
different peer (ranked by :mod:`placement`, spares used when a peer refuses),
and only then record it in the index, in one transaction. Reading a pack: fetch
shards (data shards first, so the common case needs no decoding), verify each
against the Merkle root the index kept, treat any bad shard as an erasure, and
decode from the first k good ones.

What the repository learns of its peers during one run (one command, one
scheduled backup) — the **run state**:

* **down** — a peer that could not be reached is passed over (tried last) for
  :data:`DOWN_SECONDS` (:meth:`Repository.mark_down`);
* **full** — a peer that refused a shard for want of room gets no more shards
  for the rest of the run, without a round trip to ask
  (:meth:`Repository.mark_full`); the backup summary names it and why;
* **space** — what each peer said it holds for us and offers (a
  :class:`~p2pbackup.stores.folder.Space`), asked of every peer at once by
  :meth:`Repository.probe_peers` at the start of a backup; its **room** is
  lowered by every shard sent there since (from the moment the put starts,
  as the node reserves it, and given back if the put fails). Placement
  weighs peers by their room, and a peer whose room is too small for a
  pack's shard is **passed over** for a peer with room: the summary names it
  too, though it is not counted full (a smaller shard may still fit);
* **observations** — whether a peer answered, counted into the index's probe
  counts (its uptime record, which placement also weighs): once per peer
  per run, and again each time the answer changes (a peer that dies
  mid-run). Counting every put would let one long backup drown the record in
  successes, while a dead peer is asked once and then skipped.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import attrs
import trio

from p2pbackup.core import blobs, crypto, erasure, formats, merkle, packer, placement
from p2pbackup.core.keys import Keyring
from p2pbackup.engine.index import Index
from p2pbackup.engine.progress import human_bytes
from p2pbackup.errors import (
    FormatError,
    IntegrityError,
    NotEnoughShardsError,
    P2PBackupError,
    PeerUnavailableError,
    ShardNotFoundError,
    StoreError,
    StoreFullError,
    UsageError,
)
from p2pbackup.model import (
    PEER_KIND_DIR,
    PEER_KIND_NODE,
    BlobType,
    IndexSegment,
    PackRecord,
    PeerRecord,
    RepositoryConfig,
    RootRecord,
    ShardHeader,
    ShardLocation,
)
from p2pbackup.net.network import Address, Network, TcpNetwork
from p2pbackup.stores.folder import FolderShardStore, ShardRoot, ShardStore, Space
from p2pbackup.stores.remote import Locator, RemoteShardStore
from p2pbackup.wire.session import Identity

ROOT_ENVELOPE_KIND = b"ROOT"
#: Seconds a peer that could not be reached is passed over (tried last).
DOWN_SECONDS = 300.0
#: Seconds every peer has to answer a probe (status, the start of a backup).
PROBE_SECONDS = 5.0
#: Decoded packs kept in memory for reading trees and small files.
_PACK_CACHE_SIZE = 4
#: Sealed blobs up to this size are opened on trio's thread.
_INLINE_OPEN = 64 * 1024


def host_of(peer: PeerRecord) -> str:
    """The machine a peer lives on, as far as placement can tell: a node's
    address host; each folder counts as its own (a disk of its own)."""
    if peer.kind == PEER_KIND_NODE:
        try:
            return Address.parse(peer.location).host
        except UsageError:
            pass
    return f"folder {peer.peer_id}"


def open_store(
    peer: PeerRecord,
    keyring: Keyring,
    network: Network,
    *,
    locate: Locator | None = None,
    moved: Callable[[Address], None] | None = None,
) -> ShardStore:
    """The shard store that ``peer`` keeps for the owner of ``keyring``; a node
    that stopped answering at its location is looked for with ``locate``."""
    if peer.kind == PEER_KIND_DIR:
        return FolderShardStore(Path(peer.location), keyring.node_id)
    if peer.kind == PEER_KIND_NODE:
        return RemoteShardStore(
            network,
            Identity.from_keyring(keyring),
            Address.parse(peer.location),
            bytes.fromhex(peer.peer_id),
            locate=locate,
            moved=moved,
        )
    raise UsageError(f"peer {peer.peer_id} has kind {peer.kind!r}, which this version cannot reach")


@attrs.frozen
class ShardFailure:
    """Why one shard could not be used."""

    peer_id: str
    index: int
    reason: str


@attrs.frozen
class ProbeAnswer:
    """What one peer said when probed: its space, or why it said nothing."""

    peer_id: str
    space: Space | None
    problem: str = ""

    @property
    def answered(self) -> bool:
        return self.space is not None


def seal_root_record(keyring: Keyring, record: RootRecord) -> bytes:
    """The signed, encrypted envelope stored on every peer."""
    payload = crypto.seal(
        keyring.record_key,
        formats.encode_root_record(record),
        aad=b"p2pbackup-root" + keyring.node_id,
    )
    signed = formats.envelope_signed_bytes(ROOT_ENVELOPE_KIND, keyring.identity_public, payload)
    signature = crypto.sign(keyring.identity_seed, signed)
    return formats.encode_signed_envelope(
        ROOT_ENVELOPE_KIND, keyring.identity_public, payload, signature
    )


def open_root_record(keyring: Keyring, data: bytes) -> RootRecord:
    """Verify and decrypt a root record envelope; IntegrityError if it is not ours."""
    envelope = formats.decode_signed_envelope(data)
    if envelope.kind != ROOT_ENVELOPE_KIND:
        raise FormatError(f"root record: envelope of kind {envelope.kind!r}")
    if envelope.signer_public_key != keyring.identity_public:
        raise IntegrityError("root record: signed by another key")
    crypto.verify(
        envelope.signer_public_key,
        formats.envelope_signed_bytes(envelope.kind, envelope.signer_public_key, envelope.payload),
        envelope.signature,
    )
    plain = crypto.unseal(
        keyring.record_key, envelope.payload, aad=b"p2pbackup-root" + keyring.node_id
    )
    return formats.decode_root_record(plain)


class Repository:
    """One home's view of its data on its peers."""

    def __init__(
        self,
        keyring: Keyring,
        index: Index,
        network: Network | None = None,
        *,
        locate: Locator | None = None,
    ) -> None:
        self.keyring = keyring
        self.index = index
        self.network: Network = network if network is not None else TcpNetwork()
        #: Where to look for a node peer that stopped answering (the DHT).
        self.locate = locate
        self._stores: dict[str, ShardStore] = {}
        #: Peer id -> trio time until which it counts as down (see mark_down).
        self._down_until: dict[str, float] = {}
        #: The rest of the run state (module docstring): peer id -> why it
        #: is full; its space; whether it answered, as last counted.
        self._full: dict[str, str] = {}
        self._passed_over: dict[str, str] = {}
        self._space: dict[str, Space] = {}
        #: Bytes sent (or being sent) to each peer since its space was asked.
        self._taken: collections.Counter[str] = collections.Counter()
        self._observed: dict[str, bool] = {}
        self._pack_cache: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()

    @property
    def config(self) -> RepositoryConfig:
        return self.index.config()

    # -- peers ----------------------------------------------------------------

    def peers(self) -> list[PeerRecord]:
        return self.index.peers()

    def store(self, peer_id: str) -> ShardStore:
        store = self._stores.get(peer_id)
        if store is None:
            for peer in self.index.peers():
                if peer.peer_id == peer_id:
                    store = open_store(
                        peer,
                        self.keyring,
                        self.network,
                        locate=self.locate,
                        moved=functools.partial(self._peer_moved, peer),
                    )
                    break
            else:
                raise PeerUnavailableError(f"peer {peer_id} is not configured")
            self._stores[peer_id] = store
        return store

    def _peer_moved(self, peer: PeerRecord, address: Address) -> None:
        """A node peer answered at a new address: remember it for next time."""
        location = str(address)
        with self.index.transaction():
            self.index.add_peer(attrs.evolve(peer, location=location))
            friend = self.index.friend(bytes.fromhex(peer.peer_id))
            if friend is not None and location not in friend.addresses:
                # Newest first; a few old ones stay as DHT entry points.
                self.index.set_friend_addresses(friend.node_id, (location, *friend.addresses)[:4])

    def mark_down(self, peer_id: str) -> None:
        """Remember that ``peer_id`` could not be reached, for :data:`DOWN_SECONDS`.

        A dead peer costs a connect timeout; without this, every pack of a
        backup would pay it again before turning to a spare.
        """
        self._down_until[peer_id] = trio.current_time() + DOWN_SECONDS

    def is_down(self, peer_id: str) -> bool:
        until = self._down_until.get(peer_id)
        return until is not None and trio.current_time() < until

    def mark_full(self, peer_id: str, reason: str) -> None:
        """Remember that ``peer_id`` refused a shard for want of room: it gets
        no more for the rest of this run (a quota does not grow by itself)."""
        self._full.setdefault(peer_id, reason)

    def is_full(self, peer_id: str) -> bool:
        return peer_id in self._full

    def full_peers(self) -> dict[str, str]:
        """Each peer found full in this run or passed over for want of room,
        and why (module docstring)."""
        return {**self._passed_over, **self._full}

    def room(self, peer_id: str) -> int | None:
        """Bytes more ``peer_id`` would take, from what it said when last
        asked less what was sent there since; None if not known."""
        space = self._space.get(peer_id)
        if space is None or space.room is None:
            return None
        return max(0, space.room - self._taken[peer_id])

    def observe(self, peer_id: str, answered: bool) -> None:
        """Count in the index whether ``peer_id`` answered — once per run,
        and again when that changes (module docstring)."""
        if self._observed.get(peer_id) is answered:
            return
        self._observed[peer_id] = answered
        self.index.record_probe(peer_id, answered)

    async def probe_peers(
        self, timeout: float = PROBE_SECONDS, *, seen_at: int | None = None
    ) -> dict[str, ProbeAnswer]:
        """Ask every peer its space at once, each within ``timeout`` seconds.

        A peer that answers is recorded as seen (at unix second ``seen_at``,
        default now) and its space kept for placement; one that does not is
        marked down, so the first pack does not wait for it. Either way the
        answer counts toward the peer's uptime.
        """
        answers: dict[str, ProbeAnswer] = {}

        async def probe(peer_id: str) -> None:
            try:
                with trio.fail_after(timeout):
                    space = await self.store(peer_id).space()
            except trio.TooSlowError:
                answers[peer_id] = ProbeAnswer(peer_id, None, f"no answer within {timeout:g} s")
            except P2PBackupError as error:
                answers[peer_id] = ProbeAnswer(peer_id, None, str(error))
            else:
                answers[peer_id] = ProbeAnswer(peer_id, space)

        async with trio.open_nursery() as nursery:
            for peer in self.peers():
                nursery.start_soon(probe, peer.peer_id)
        when = int(time.time()) if seen_at is None else seen_at
        with self.index.transaction():
            for peer_id, answer in answers.items():
                if answer.space is not None:
                    self._space[peer_id] = answer.space
                    self._taken.pop(peer_id, None)  # the answer counts them
                    self._down_until.pop(peer_id, None)
                    self.index.set_seen(peer_id, when)
                else:
                    self.mark_down(peer_id)
                self.observe(peer_id, answer.answered)
        return answers

    async def list_held(
        self, peer_ids: Iterable[str], timeout: float | None = None
    ) -> tuple[dict[str, frozenset[bytes]], dict[str, str]]:
        """The shard ids each peer lists now, asked all at once (each within
        ``timeout`` seconds, if given): one listing per peer, not one question
        per shard. Also, for each peer that did not answer, why."""
        held: dict[str, frozenset[bytes]] = {}
        problems: dict[str, str] = {}

        async def list_one(peer_id: str) -> None:
            try:
                with trio.fail_after(math.inf if timeout is None else timeout):
                    held[peer_id] = frozenset(await self.store(peer_id).list())
            except trio.TooSlowError:
                problems[peer_id] = f"no listing within {timeout:g} s"
            except P2PBackupError as error:
                problems[peer_id] = str(error)

        async with trio.open_nursery() as nursery:
            for peer_id in peer_ids:
                nursery.start_soon(list_one, peer_id)
        return held, problems

    def live_holders(
        self, held: Mapping[str, frozenset[bytes]]
    ) -> Iterator[tuple[int, int, list[str]]]:
        """Every pack in the index as (k, n, the peers whose listing in
        ``held`` has their shard of it)."""
        for pack_id, k, n, shards in self.index.pack_placements():
            yield k, n, [p for p, i in shards if formats.shard_id(pack_id, i) in held.get(p, ())]

    def peer_weights(self, peer_ids: list[str]) -> dict[str, placement.PeerWeight]:
        """What placement knows of each peer: its room now and its uptime."""
        counts = self.index.probe_counts()
        weights = {}
        for peer_id in peer_ids:
            count = counts.get(peer_id)
            weights[peer_id] = placement.PeerWeight(
                free=self.room(peer_id),
                uptime=1.0 if count is None else placement.uptime(count.answered, count.asked),
            )
        return weights

    def _pass_over(self, peer_id: str, need: int) -> None:
        space = self._space.get(peer_id)
        room = self.room(peer_id)
        if space is None or space.offered is None or room is None:
            return
        self._passed_over.setdefault(
            peer_id,
            f"it offers us {human_bytes(space.offered)}, {human_bytes(room)} of it free: "
            f"no room for a shard of {human_bytes(need)}",
        )

    async def aclose(self) -> None:
        """Close the connections that network peers keep open."""
        stores, self._stores = self._stores, {}
        for store in stores.values():
            await store.aclose()

    # -- writing packs --------------------------------------------------------

    def code(self) -> placement.Code:
        """The code for the next pack, adapted to the peers neither known to
        be down nor full (:func:`placement.choose_code`); UsageError if too few."""
        config = self.config
        usable = sum(
            1
            for peer in self.peers()
            if not self.is_down(peer.peer_id) and not self.is_full(peer.peer_id)
        )
        try:
            return placement.choose_code(config.k, config.n, usable)
        except UsageError as error:
            if not self._full:
                raise
            full = "; ".join(f"{peer}: {reason}" for peer, reason in sorted(self._full.items()))
            raise UsageError(f"{error} ({len(self._full)} more are full: {full})") from None

    def check_enough_peers(self) -> None:
        """UsageError unless there are enough peers to place a pack's shards on."""
        self.code()

    async def write_pack(
        self, builder: packer.PackBuilder, *, is_index: bool = False
    ) -> PackRecord:
        """Encode, place and upload a pack, then record it in the index."""
        config = self.config
        code = self.code()
        peers = [p for p in self.peers() if not self.is_full(p.peer_id)]
        peer_ids = [p.peer_id for p in peers]
        hosts = {p.peer_id: host_of(p) for p in peers}
        ident, pack_size, payloads, roots, shard_size = await trio.to_thread.run_sync(
            _finish_pack, builder, self.keyring.data_key, code.k, code.n, config.block_size
        )
        need = formats.SHARD_HEADER_SIZE + shard_size
        weights = placement.weigh_peers(self.peer_weights(peer_ids), need)
        # One shard per host first; peers without room for the shard after
        # those with room, and peers known to be down last, as spares of last
        # resort (the sort is stable: each group keeps its ranking).
        ranked = sorted(
            placement.spread_hosts(placement.rank_weighted(ident, weights), hosts.__getitem__),
            key=lambda peer: (self.is_down(peer), weights[peer] == 0),
        )
        spares = collections.deque(ranked[code.n :])
        for peer_id in spares:
            room = self.room(peer_id)
            if room is not None and room < need and not self.is_down(peer_id):
                self._pass_over(peer_id, need)
        placed: dict[int, str] = {}
        failures: list[ShardFailure] = []

        async def place(index: int, peer_id: str) -> None:
            while True:
                # Reserved before it is sent, as the node reserves it: a
                # pack placed meanwhile sees the room that is left.
                self._taken[peer_id] += need
                try:
                    await self.store(peer_id).put(
                        formats.shard_id(ident, index),
                        payloads[index],
                        ShardRoot(config.block_size, roots[index]),
                    )
                except StoreError as exc:
                    self._taken[peer_id] -= need
                    if isinstance(exc, PeerUnavailableError):
                        self.mark_down(peer_id)
                        self.observe(peer_id, False)
                    elif isinstance(exc, StoreFullError):
                        self.mark_full(peer_id, str(exc))
                        self.observe(peer_id, True)  # it answered, if only to refuse
                    failures.append(ShardFailure(peer_id, index, str(exc)))
                    # A spare found full by another shard meanwhile is skipped.
                    while spares and self.is_full(spares[0]):
                        spares.popleft()
                    if not spares:
                        return
                    peer_id = spares.popleft()
                except BaseException:
                    self._taken[peer_id] -= need
                    raise
                else:
                    placed[index] = peer_id
                    self.observe(peer_id, True)
                    payloads[index] = memoryview(b"")  # sent: let it go
                    return

        async with trio.open_nursery() as nursery:
            for index in range(code.n):
                nursery.start_soon(place, index, ranked[index])
        # One lost peer must not lose data the moment it is written.
        if len(placed) < min(code.n, code.k + 1):
            reasons = "; ".join(f"{f.peer_id}: {f.reason}" for f in failures)
            raise PeerUnavailableError(
                f"could place only {len(placed)} of {code.n} shards of a pack ({reasons})"
            )
        record = PackRecord(
            pack_id=ident,
            size=pack_size,
            k=code.k,
            n=code.n,
            shard_size=shard_size,
            block_size=config.block_size,
            shards=tuple(ShardLocation(i, placed[i], roots[i]) for i in sorted(placed)),
            blobs=builder.entries,
        )
        with self.index.transaction():
            self.index.add_pack(record, is_index=is_index)
        return record

    # -- reading packs --------------------------------------------------------

    async def write_index_segment(self, pack_ids: list[bytes]) -> None:
        """Store the records of ``pack_ids`` as an index pack, so a new home finds them."""
        if not pack_ids:
            return
        records = []
        for pack_id in pack_ids:
            record = self.index.pack(pack_id)
            if record is not None:
                records.append(record)
        data = formats.encode_index_segment(IndexSegment(tuple(records)))
        ident = blobs.blob_id(self.keyring.dedup_key, data)
        sealed = await trio.to_thread.run_sync(
            blobs.seal_blob, self.keyring.data_key, BlobType.INDEX, ident, data
        )
        builder = packer.PackBuilder()
        builder.add(BlobType.INDEX, ident, sealed, len(data))
        await self.write_pack(builder, is_index=True)
        with self.index.transaction():
            self.index.mark_in_segment(pack_ids)

    def expected_shards(self) -> dict[str, set[bytes]]:
        """Peer id → the shard ids the index says it holds."""
        expected: dict[str, set[bytes]] = {p.peer_id: set() for p in self.peers()}
        for pack_id in self.index.pack_ids():
            record = self.index.pack(pack_id, with_blobs=False)
            assert record is not None
            for location in record.shards:
                expected.setdefault(location.peer_id, set()).add(
                    formats.shard_id(pack_id, location.index)
                )
        return expected

    async def read_pack(
        self,
        record: PackRecord,
        failures: list[ShardFailure] | None = None,
        *,
        use_cache: bool = True,
    ) -> bytes:
        """The verified bytes of a pack, from any k good shards.

        ``use_cache`` keeps the last few packs in memory (for trees); a restore
        streaming file data passes False so memory stays bounded.
        """
        cached = self._pack_cache.get(record.pack_id)
        if cached is not None:
            self._pack_cache.move_to_end(record.pack_id)
            return cached
        if failures is None:
            failures = []
        # Data shards first: with all of them the decode is a concatenation.
        # Peers known to be down are tried last.
        candidates = sorted(record.shards, key=lambda s: (self.is_down(s.peer_id), s.index))
        good: dict[int, bytes] = {}
        position = 0
        while len(good) < record.k and position < len(candidates):
            wanted = record.k - len(good)
            batch = candidates[position : position + wanted]
            position += len(batch)
            async with trio.open_nursery() as nursery:
                for location in batch:
                    nursery.start_soon(self._fetch_shard, record, location, good, failures)
        if len(good) < record.k:
            raise NotEnoughShardsError(
                f"pack {record.pack_id.hex()[:16]}: only {len(good)} good shards of the "
                f"{record.k} needed ({'; '.join(f'{f.peer_id}: {f.reason}' for f in failures)})"
            )
        # Each shard matched the Merkle root the index kept, so the decoded
        # bytes are the pack; hashing it again would only slow the restore
        # (docs/performance.md#restore).
        data = await trio.to_thread.run_sync(erasure.decode, good, record.k, record.n, record.size)
        if not use_cache:
            return data
        self._pack_cache[record.pack_id] = data
        while len(self._pack_cache) > _PACK_CACHE_SIZE:
            self._pack_cache.popitem(last=False)
        return data

    async def fetch_verified_shard(self, record: PackRecord, location: ShardLocation) -> bytes:
        """One shard's data, checked against its header and Merkle root."""
        raw = await self.store(location.peer_id).get(
            formats.shard_id(record.pack_id, location.index)
        )
        return await trio.to_thread.run_sync(_verify_shard, record, location, raw)

    async def _fetch_shard(
        self,
        record: PackRecord,
        location: ShardLocation,
        good: dict[int, bytes],
        failures: list[ShardFailure],
    ) -> None:
        try:
            good[location.index] = await self.fetch_verified_shard(record, location)
        except ShardNotFoundError:
            failures.append(ShardFailure(location.peer_id, location.index, "missing"))
        except PeerUnavailableError as exc:
            self.mark_down(location.peer_id)
            failures.append(ShardFailure(location.peer_id, location.index, str(exc)))
        except (StoreError, IntegrityError, UsageError) as exc:
            failures.append(ShardFailure(location.peer_id, location.index, str(exc)))

    async def load_blob(self, blob_id: bytes, blob_type: BlobType) -> bytes:
        """The plaintext of a blob, from the first of its packs that can be read."""
        locations = self.index.blob_locations(blob_id)
        if not locations:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} is not in the index")
        errors: list[str] = []
        for location in locations:
            record = self.index.pack(location.pack_id, with_blobs=False)
            if record is None:
                continue
            try:
                data = await self.read_pack(record)
                sealed = packer.blob_bytes(data, location.entry)
                opener = functools.partial(
                    blobs.open_blob,
                    self.keyring.data_key,
                    self.keyring.dedup_key,
                    blob_type,
                    blob_id,
                    sealed,
                )
                if location.entry.length <= _INLINE_OPEN:
                    # A small tree: a thread hand-off would cost more than this.
                    return opener()
                return await trio.to_thread.run_sync(opener)
            except (NotEnoughShardsError, IntegrityError) as exc:
                errors.append(str(exc))
        raise NotEnoughShardsError(f"blob {blob_id.hex()[:16]} cannot be read: {'; '.join(errors)}")

    # -- the root record --------------------------------------------------------

    def build_root_record(self) -> RootRecord:
        index_packs = []
        for pack_id in self.index.pack_ids(is_index=True):
            record = self.index.pack(pack_id)
            if record is not None:
                index_packs.append(record)
        return RootRecord(
            sequence=self.index.root_sequence() + 1,
            time_ns=time.time_ns(),
            config=self.config,
            peers=tuple(self.peers()),
            index_packs=tuple(index_packs),
            snapshots=tuple(sid for sid, _ in self.index.snapshots()),
            friends=tuple(self.index.friends()),
        )

    async def publish_root(self) -> int:
        """Write a new root record to every peer; returns how many took it."""
        record = self.build_root_record()
        envelope = seal_root_record(self.keyring, record)
        stored = 0
        errors: list[str] = []

        async def put(peer_id: str) -> None:
            nonlocal stored
            try:
                await self.store(peer_id).put_root(envelope)
                stored += 1
            except StoreError as exc:
                errors.append(f"{peer_id}: {exc}")

        async with trio.open_nursery() as nursery:
            for peer in self.peers():
                nursery.start_soon(put, peer.peer_id)
        if stored == 0:
            raise PeerUnavailableError(f"no peer accepted the root record ({'; '.join(errors)})")
        self.index.set_root_sequence(record.sequence)
        return stored


def _finish_pack(
    builder: packer.PackBuilder, data_key: bytes, k: int, n: int, block_size: int
) -> tuple[bytes, int, list[memoryview], list[bytes], int]:
    """Runs in a worker thread: the pack's id and size, its n shards and their
    roots, and the shard size.

    Joining, hashing and coding a pack takes tens of milliseconds; on the
    event loop that would stall every upload in flight meanwhile.
    """
    parts, _header = builder.finish_parts(data_key)
    ident = packer.new_pack_id()
    pack_size = sum(len(part) for part in parts)
    payloads, roots, shard_size = _encode_pack(parts, pack_size, ident, k, n, block_size)
    # The blobs are dropped here: only the shards live on, so memory stays
    # bounded by the shards of the packs in flight.
    return ident, pack_size, payloads, roots, shard_size


def _encode_pack(
    parts: list[bytes], pack_size: int, ident: bytes, k: int, n: int, block_size: int
) -> tuple[list[memoryview], list[bytes], int]:
    """Runs in a worker thread: the n shards of a pack with their headers, and roots.

    Each shard is coded straight into the buffer that will be stored, behind
    its header, from the pack's parts: the pack is never joined, there is no
    parity array beside the shards, and no copy of a shard (each a memcpy
    under the GIL) puts the header in front.
    """
    shard_size = erasure.shard_length(pack_size, k)
    head = formats.SHARD_HEADER_SIZE
    payloads = erasure.unfilled_buffers(n, head + shard_size)
    erasure.encode_parts_into(parts, k, n, [payload[head:] for payload in payloads])
    roots: list[bytes] = []
    for index in range(n):
        payloads[index][:head] = formats.encode_shard_header(
            ShardHeader(
                pack_id=ident,
                index=index,
                k=k,
                n=n,
                pack_size=pack_size,
                shard_size=shard_size,
                block_size=block_size,
            )
        )
        # Over the whole stored shard, header included: the root a host
        # verifies on upload and answers audits against.
        roots.append(merkle.merkle_root(payloads[index], block_size))
    return payloads, roots, shard_size


def _verify_shard(record: PackRecord, location: ShardLocation, raw: bytes) -> bytes:
    merkle.verify_root(raw, record.block_size, location.merkle_root)
    header = formats.decode_shard_header(raw)
    expected = (record.pack_id, location.index, record.k, record.n, record.size, record.shard_size)
    got = (header.pack_id, header.index, header.k, header.n, header.pack_size, header.shard_size)
    if got != expected:
        raise IntegrityError("shard header does not match the index")
    data = raw[formats.SHARD_HEADER_SIZE :]
    if len(data) != record.shard_size:
        raise IntegrityError(f"shard is {len(data)} bytes, expected {record.shard_size}")
    return data
