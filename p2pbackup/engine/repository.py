"""The repository: one owner's packs on its peers, and the index that finds them.

Nouns:

* **repository** — the keyring, the local index and the peers' shard stores of
  one home, and the operations that move packs between them.
* **root record** — what a new home needs to find everything again; written to
  every peer after each change, inside a **signed envelope**: the payload is
  sealed with the record key and the envelope signed by the identity key
  (:mod:`~p2pbackup.engine.rootrecord`).

Writing a pack: finish it, erasure-code it into n shards, put each shard on a
different peer (ranked by :mod:`placement`, spares used when a peer refuses),
and only then record it in the index, in one transaction. Reading a pack: fetch
k shards at once (data shards first, so the common case needs no decoding),
verify each against the Merkle root the index kept, treat any bad shard as an
erasure, and decode from the first k good ones. A fetch that fails, or is
overdue while the others have answered, has the next shard fetched beside it
(:func:`~p2pbackup.engine.race.race`): one dead or hung peer never holds a
read up for its timeout.

What the repository learns of its peers during one run (one command, one
scheduled backup) — the **run state**:

* **down** — a peer that could not be reached, or did not answer a probe
  while the others did, is passed over (tried last) for
  :data:`~p2pbackup.engine.runstate.DOWN_SECONDS`
  (:meth:`~p2pbackup.engine.runstate.RunState.mark_down`);
* **slow** — a peer whose shard had not come when the others' had: later
  reads ask it after the others, for the rest of the run
  (:meth:`~p2pbackup.engine.runstate.RunState.mark_slow`);
* **full**, **refused** — a peer that refused a shard, for want of room or
  otherwise (a node that stores only for its friends), gets no more shards
  for the rest of the run, without a round trip to ask
  (:meth:`~p2pbackup.engine.runstate.RunState.mark_full`,
  :meth:`~p2pbackup.engine.runstate.RunState.mark_refused`);
* **space** — what each peer said it holds for us and offers (a
  :class:`~p2pbackup.stores.shardstore.Space`), asked of every peer at once by
  :meth:`Repository.probe_peers` at the start of a backup; its **room** is
  lowered by every shard sent there since (from the moment the put starts,
  as the node reserves it, and given back if the put fails). The code of a
  pack counts only the peers with room for its shard
  (:func:`~p2pbackup.core.placement.fit_code`); placement weighs peers by
  their room, and a peer whose room is too small for a pack's shard is
  **passed over** for a peer with room, though it is not counted full (a
  smaller shard may still fit);
* **passed over**, in the backup summary — every peer that was down, full,
  refused or without room at some point of the run, and why
  (:meth:`~p2pbackup.engine.runstate.RunState.passed_over`);
* **observations** — whether a peer answered, counted into the index's probe
  counts (its uptime record, which placement also weighs): once per peer
  per run, and again each time the answer changes (a peer that dies
  mid-run). Counting every put would let one long backup drown the record in
  successes, while a dead peer is asked once and then skipped.

The pieces the repository is made of:

* :class:`~p2pbackup.engine.runstate.RunState` keeps the run state;
* a :class:`StoreCache` opens each peer's shard store once and remembers a
  node peer found at a new address; a :class:`PackCache` keeps the last few
  packs read, decoded;
* :mod:`~p2pbackup.engine.shards` codes a pack into its shards and checks a
  shard read back, in worker threads;
* writing a pack is a **plan** — which peer gets which shard, and the spares
  (:func:`~p2pbackup.core.placement.plan_pack`, pure; peers that audits
  disqualified or that are leaving are left out, and the others weighed by their audit score
  too) — then the **upload**
  of its shards, each retried on the next spare when a peer refuses, then
  the **commit** of the pack to the index;
* :mod:`~p2pbackup.engine.rootrecord` builds, seals and publishes the root
  record.

The erasure code (:mod:`~p2pbackup.core.erasure`, and with it numpy) is
imported by the methods that place or decode a pack, not with this module:
a command that only reads the index (``snapshots``) does not pay for it.
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

from p2pbackup.core import blobs, chunker, formats, packer, placement
from p2pbackup.core.keys import Keyring
from p2pbackup.engine import rootrecord, shards
from p2pbackup.engine.index import BlobLocation, Index
from p2pbackup.engine.race import Patience, race
from p2pbackup.engine.runstate import RunState
from p2pbackup.engine.shards import CodedPack
from p2pbackup.errors import (
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
    ShardLocation,
)
from p2pbackup.net.network import Address, Network, TcpNetwork
from p2pbackup.stores.folder import FolderShardStore
from p2pbackup.stores.remote import Locator, RemoteShardStore
from p2pbackup.stores.shardstore import ShardRoot, ShardStore, Space
from p2pbackup.wire.relay import Route
from p2pbackup.wire.session import Identity

#: Seconds every peer has to answer a probe (status, check, the start of a
#: backup), at the most.
PROBE_SECONDS = 5.0
#: When a probe is given up on while the other peers have answered: an
#: answer is a few round trips, so a peer three times slower than the
#: slowest other one is taken for down — but never before two seconds, which
#: a friend across an ocean (three round trips of 300 ms) answers well
#: within, whatever the peers next door answered in.
PROBE_PATIENCE = Patience(floor=2.0, factor=3.0, limit=PROBE_SECONDS)
#: When a shard fetch gets the next shard fetched beside it: three times the
#: longest fetch of the pack so far, a quarter second at the least; while no
#: shard has come yet, after as long as a probe may take.
READ_PATIENCE = Patience(floor=0.25, factor=3.0, limit=PROBE_SECONDS)
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
    certificate: bytes | None = None,
) -> ShardStore:
    """The shard store that ``peer`` keeps for the owner of ``keyring``; a node
    that stopped answering at its location is looked for with ``locate``.
    With a delegation ``certificate``, the node's store of the owner the
    certificate names, reached as its delegate (``keyring``'s node)."""
    if peer.kind == PEER_KIND_DIR:
        if certificate is not None:
            raise PeerUnavailableError(f"a delegate cannot reach the folder peer {peer.peer_id}")
        return FolderShardStore(Path(peer.location), keyring.node_id)
    if peer.kind == PEER_KIND_NODE:
        return RemoteShardStore(
            network,
            Identity.from_keyring(keyring),
            Address.parse(peer.location),
            bytes.fromhex(peer.peer_id),
            locate=locate,
            moved=moved,
            certificate=certificate,
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


class StoreCache:
    """Each peer's shard store, opened at first use and kept until
    :meth:`aclose` (a node peer's keeps its connection open meanwhile)."""

    def __init__(
        self,
        keyring: Keyring,
        index: Index,
        network: Network,
        locate: Locator | None,
        certificate: bytes | None = None,
    ) -> None:
        self._keyring = keyring
        self._index = index
        self._network = network
        self._certificate = certificate
        #: Where to look for a node peer that stopped answering (the DHT).
        self._locate = locate
        self._stores: dict[str, ShardStore] = {}

    def get(self, peer_id: str) -> ShardStore:
        store = self._stores.get(peer_id)
        if store is None:
            for peer in self._index.peers():
                if peer.peer_id == peer_id:
                    store = open_store(
                        peer,
                        self._keyring,
                        self._network,
                        locate=self._locate,
                        moved=functools.partial(self._peer_moved, peer),
                        certificate=self._certificate,
                    )
                    break
            else:
                raise PeerUnavailableError(f"peer {peer_id} is not configured")
            self._stores[peer_id] = store
        return store

    def opened(self, peer_id: str) -> ShardStore | None:
        """The peer's store if it was opened already (None: not yet)."""
        return self._stores.get(peer_id)

    def _peer_moved(self, peer: PeerRecord, address: Address) -> None:
        """A node peer answered at a new address: remember it for next time."""
        location = str(address)
        index = self._index
        with index.transaction():
            index.add_peer(attrs.evolve(peer, location=location))
            friend = index.friend(bytes.fromhex(peer.peer_id))
            if friend is not None and location not in friend.addresses:
                # Newest first; a few old ones stay as DHT entry points.
                index.set_friend_addresses(friend.node_id, (location, *friend.addresses)[:4])

    async def aclose(self) -> None:
        """Close the connections that network peers keep open."""
        stores, self._stores = self._stores, {}
        for store in stores.values():
            await store.aclose()


class PackCache:
    """The last few packs read, decoded, the least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._packs: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()

    def get(self, pack_id: bytes) -> bytes | None:
        data = self._packs.get(pack_id)
        if data is not None:
            self._packs.move_to_end(pack_id)
        return data

    def put(self, pack_id: bytes, data: bytes) -> None:
        self._packs[pack_id] = data
        while len(self._packs) > self._size:
            self._packs.popitem(last=False)


class Repository:
    """One home's view of its data on its peers."""

    def __init__(
        self,
        keyring: Keyring,
        index: Index,
        network: Network | None = None,
        *,
        locate: Locator | None = None,
        certificate: bytes | None = None,
    ) -> None:
        self.keyring = keyring
        self.index = index
        self.network: Network = network if network is not None else TcpNetwork()
        #: What this run has learned of the peers (module docstring).
        self.run = RunState(trio.current_time)
        #: A delegation certificate: this is another owner's repository,
        #: reached as its delegate (``keyring`` is the delegate's).
        self.certificate = certificate
        self._stores = StoreCache(keyring, index, self.network, locate, certificate)
        self._packs = PackCache(_PACK_CACHE_SIZE)
        #: Write the root record even over another home's (a **takeover**,
        #: :mod:`~p2pbackup.engine.rootrecord`).
        self.takeover = False
        #: The home's settings to carry in the root record (its
        #: ``config.toml``), read each time one is written; the app sets it.
        self.settings: Callable[[], bytes] = lambda: b""

    def chunker_params(self) -> chunker.ChunkerParams:
        """How this repository cuts files into chunks (its config, its secret seed)."""
        config = self.config
        return chunker.ChunkerParams(
            min_size=config.chunk_min,
            avg_size=config.chunk_avg,
            max_size=config.chunk_max,
            seed=self.keyring.chunker_seed,
        )

    @property
    def config(self) -> RepositoryConfig:
        return self.index.config()

    # -- peers ----------------------------------------------------------------

    def peers(self) -> list[PeerRecord]:
        return self.index.peers()

    def store(self, peer_id: str) -> ShardStore:
        return self._stores.get(peer_id)

    def route(self, peer_id: str) -> Route | None:
        """Where this run dials node peer ``peer_id`` now: its own address, or a
        relay that the locator named when the node did not answer there; None
        for a folder peer or one not used yet in this run."""
        store = self._stores.opened(peer_id)
        return store.route if isinstance(store, RemoteShardStore) else None

    async def aclose(self) -> None:
        """Close the connections that network peers keep open."""
        await self._stores.aclose()

    def full_peers(self) -> dict[str, str]:
        """Each peer found full in this run or passed over for want of room,
        and why (module docstring)."""
        return self.run.full_peers()

    def _observe(self, peer_id: str, answered: bool) -> None:
        """Count in the index whether ``peer_id`` answered — once per run,
        and again when that changes (module docstring)."""
        if self.run.observe(peer_id, answered):
            self.index.record_probe(peer_id, answered)

    async def probe_peers(
        self, timeout: float = PROBE_SECONDS, *, seen_at: int | None = None
    ) -> dict[str, ProbeAnswer]:
        """Ask every peer its space at once, each within ``timeout`` seconds,
        and none once it is overdue while the others have answered
        (:data:`PROBE_PATIENCE`): one hung peer does not hold up the rest.

        A peer that answers is recorded as seen (at unix second ``seen_at``,
        default now) and its space kept for placement; one that does not is
        marked down, so the first pack does not wait for it. Either way the
        answer counts toward the peer's uptime.
        """

        async def probe(peer_id: str) -> Space:
            try:
                with trio.fail_after(timeout):
                    return await self.store(peer_id).space()
            except trio.TooSlowError:
                raise PeerUnavailableError(f"no answer within {timeout:g} s") from None

        peer_ids = [peer.peer_id for peer in self.peers()]
        patience = attrs.evolve(PROBE_PATIENCE, limit=timeout)
        asked = await race(peer_ids, probe, wanted=len(peer_ids), patience=patience, give_up=True)
        answers: dict[str, ProbeAnswer] = {}
        for peer_id in peer_ids:
            if peer_id in asked.answers:
                answers[peer_id] = ProbeAnswer(peer_id, asked.answers[peer_id])
            elif peer_id in asked.failures:
                answers[peer_id] = ProbeAnswer(peer_id, None, str(asked.failures[peer_id]))
            else:
                # Given up on: overdue while the others answered.
                waited = asked.given_up.get(peer_id, timeout)
                others = (
                    "" if asked.slowest is None else f", the others within {asked.slowest:.2f} s"
                )
                answers[peer_id] = ProbeAnswer(
                    peer_id, None, f"no answer within {waited:.1f} s{others}"
                )
        when = int(time.time()) if seen_at is None else seen_at
        with self.index.transaction():
            for peer_id, answer in answers.items():
                if answer.space is not None:
                    self.run.answered(peer_id, answer.space)
                    self.index.set_seen(peer_id, when)
                else:
                    self.run.mark_down(peer_id, answer.problem)
                self._observe(peer_id, answer.answered)
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
        for pack_id, k, n, shards_of in self.index.pack_placements():
            yield k, n, [p for p, i in shards_of if formats.shard_id(pack_id, i) in held.get(p, ())]

    def peer_weights(self, peer_ids: list[str]) -> dict[str, placement.PeerWeight]:
        """What placement knows of each peer: its room now, its uptime and its
        audit score."""
        counts = self.index.probe_counts()
        audits = self.index.peer_audits()
        weights = {}
        for peer_id in peer_ids:
            count = counts.get(peer_id)
            audited = audits.get(peer_id)
            weights[peer_id] = placement.PeerWeight(
                free=self.run.room(peer_id),
                uptime=1.0 if count is None else placement.uptime(count.answered, count.asked),
                reputation=1.0 if audited is None else audited.score,
            )
        return weights

    def placeable(self, peers: Iterable[PeerRecord]) -> list[PeerRecord]:
        """``peers`` less those that audits disqualified and those leaving
        the network: they get no new shards."""
        barred = self.index.disqualified_peers() | self.index.leaving_peers().keys()
        return [peer for peer in peers if peer.peer_id not in barred]

    # -- writing packs --------------------------------------------------------

    def code(self, size: int = 0) -> placement.Code:
        """The code for the next pack, of ``size`` bytes, adapted to the peers
        neither known to be down nor to refuse shards, and with room for one
        of it as far as is known (:func:`placement.fit_code`); UsageError if
        too few."""
        from p2pbackup.core import erasure  # numpy: see the module docstring

        config = self.config
        placeable = [peer.peer_id for peer in self.placeable(self.peers())]
        live = [
            peer_id
            for peer_id in placeable
            if not self.run.is_down(peer_id) and not self.run.is_refusing(peer_id)
        ]
        try:
            return placement.fit_code(
                config.k,
                config.n,
                [self.run.room(peer_id) for peer_id in live],
                lambda k: formats.SHARD_HEADER_SIZE + erasure.shard_length(size, k),
            )
        except UsageError as error:
            refused = dict(self.run.refused())
            refused.update(
                (peer_id, self.run.no_room(peer_id))
                for peer_id in live
                if self.run.room(peer_id) == 0 and peer_id not in refused
            )
            # Name the peers that would count but for being offline, full or
            # refusing: "add 2 more" alone sends the user shopping for peers
            # when a friend's machine is only switched off.
            offline = {p: why for p, why in self.run.down().items() if p in placeable}
            said = []
            if offline:
                named = "; ".join(f"{peer}: {why}" for peer, why in sorted(offline.items()))
                said.append(f"{len(offline)} more are offline: {named}")
            if refused:
                full = "; ".join(f"{peer}: {reason}" for peer, reason in sorted(refused.items()))
                said.append(f"{len(refused)} more are full or refuse our shards: {full}")
            if not said:
                raise
            raise UsageError(f"{error} ({'; and '.join(said)})") from None

    def check_enough_peers(self) -> None:
        """UsageError unless there are enough peers to place a pack's shards on."""
        self.code()

    async def write_pack(
        self, builder: packer.PackBuilder, *, is_index: bool = False
    ) -> PackRecord:
        """Encode, place and upload a pack, then record it in the index
        (module docstring: plan, upload, commit)."""
        block_size = self.config.block_size
        # The blobs' size: the pack's header and padding add a little.
        code = self.code(builder.size)
        peers = [p for p in self.peers() if not self.run.is_refusing(p.peer_id)]
        coded = await trio.to_thread.run_sync(
            shards.finish_pack, builder, self.keyring.data_key, code.k, code.n, block_size
        )
        plan = self._plan(coded, code.n, peers)
        leases: dict[int, int] = {}
        placed = await self._upload(coded, plan, code, block_size, leases)
        record = PackRecord(
            pack_id=coded.pack_id,
            size=coded.size,
            k=code.k,
            n=code.n,
            shard_size=coded.shard_size,
            block_size=block_size,
            shards=tuple(ShardLocation(i, placed[i], coded.roots[i]) for i in sorted(placed)),
            blobs=builder.entries,
        )
        with self.index.transaction():
            self.index.add_pack(record, is_index=is_index)
            self.index.set_lease_expiries(
                (coded.pack_id, i, placed[i], expiry) for i, expiry in leases.items()
            )
        return record

    def _plan(self, coded: CodedPack, n: int, peers: list[PeerRecord]) -> placement.PackPlan:
        """Which of ``peers`` gets which shard, from what this run knows of them."""
        peers = self.placeable(peers)
        peer_ids = [p.peer_id for p in peers]
        hosts = {p.peer_id: host_of(p) for p in peers}
        need = coded.stored_size
        plan = placement.plan_pack(
            coded.pack_id,
            n,
            self.peer_weights(peer_ids),
            need,
            hosts.__getitem__,
            down=frozenset(p for p in peer_ids if self.run.is_down(p)),
        )
        for peer_id in plan.short_of_room:
            self.run.pass_over(peer_id, need)
        return plan

    async def _upload(
        self,
        coded: CodedPack,
        plan: placement.PackPlan,
        code: placement.Code,
        block_size: int,
        leases: dict[int, int],
    ) -> dict[int, str]:
        """Put shard i on the plan's i-th target, turning to its next spare
        whenever a peer refuses; shard index -> the peer that took it. The
        lease each node granted goes to ``leases`` (shard index -> expiry).

        PeerUnavailableError if too few were placed: one lost peer must not
        lose data the moment it is written.
        """
        need = coded.stored_size
        spares = collections.deque(plan.spares)
        placed: dict[int, str] = {}
        failures: list[ShardFailure] = []

        async def place(index: int, peer_id: str) -> None:
            while True:
                # Reserved before it is sent, as the node reserves it: a
                # pack placed meanwhile sees the room that is left.
                self.run.reserve(peer_id, need)
                try:
                    expiry = await self.store(peer_id).put(
                        formats.shard_id(coded.pack_id, index),
                        coded.payloads[index],
                        ShardRoot(block_size, coded.roots[index]),
                    )
                except StoreError as exc:
                    self.run.release(peer_id, need)
                    if isinstance(exc, PeerUnavailableError):
                        self.run.mark_down(peer_id, str(exc))
                        self._observe(peer_id, False)
                    else:
                        if isinstance(exc, StoreFullError):
                            self.run.mark_full(peer_id, str(exc))
                        else:
                            self.run.mark_refused(peer_id, str(exc))
                        self._observe(peer_id, True)  # it answered, if only to refuse
                    failures.append(ShardFailure(peer_id, index, str(exc)))
                    # A spare that refused another shard meanwhile is skipped.
                    while spares and self.run.is_refusing(spares[0]):
                        spares.popleft()
                    if not spares:
                        return
                    peer_id = spares.popleft()
                except BaseException:
                    self.run.release(peer_id, need)
                    raise
                else:
                    placed[index] = peer_id
                    if expiry is not None:
                        leases[index] = expiry
                    self._observe(peer_id, True)
                    coded.release(index)
                    return

        async with trio.open_nursery() as nursery:
            for index, peer_id in enumerate(plan.targets):
                nursery.start_soon(place, index, peer_id)
        if len(placed) < min(code.n, code.k + 1):
            reasons = "; ".join(f"{f.peer_id}: {f.reason}" for f in failures)
            raise PeerUnavailableError(
                f"could place only {len(placed)} of {code.n} shards of a pack ({reasons})"
            )
        return placed

    async def write_index_segment(self, pack_ids: list[bytes]) -> PackRecord | None:
        """Store the records of ``pack_ids`` as an index pack, so a new home
        finds them; the index pack's record (None: nothing to store)."""
        if not pack_ids:
            return None
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
        builder = packer.PackBuilder(self.config.pack_size)
        builder.add(BlobType.INDEX, ident, sealed, len(data))
        record = await self.write_pack(builder, is_index=True)
        with self.index.transaction():
            self.index.mark_in_segment(pack_ids)
        return record

    def expected_shards(self) -> dict[str, set[bytes]]:
        """Peer id → the shard ids the index says it holds (displaced copies,
        which a repair keeps counting on, included)."""
        expected: dict[str, set[bytes]] = {p.peer_id: set() for p in self.peers()}
        for pack_id in self.index.pack_ids():
            record = self.index.pack(pack_id, with_blobs=False)
            assert record is not None
            for location in record.shards:
                expected.setdefault(location.peer_id, set()).add(
                    formats.shard_id(pack_id, location.index)
                )
        for pack_id, copies in self.index.displaced().items():
            for copy in copies:
                expected.setdefault(copy.location.peer_id, set()).add(
                    formats.shard_id(pack_id, copy.location.index)
                )
        return expected

    # -- reading packs --------------------------------------------------------

    async def read_pack(
        self,
        record: PackRecord,
        failures: list[ShardFailure] | None = None,
        *,
        use_cache: bool = True,
    ) -> bytes:
        """The verified bytes of a pack, from any k good shards.

        ``use_cache`` keeps the last few packs in memory (for trees); a check
        or a prune reading every pack once passes False.
        """
        cached = self._packs.get(record.pack_id)
        if cached is not None:
            return cached
        pieces = await self.read_pack_pieces(record, failures)
        data = await trio.to_thread.run_sync(b"".join, pieces)
        if use_cache:
            self._packs.put(record.pack_id, data)
        return data

    async def read_pack_pieces(
        self, record: PackRecord, failures: list[ShardFailure] | None = None
    ) -> list[memoryview]:
        """:meth:`read_pack`'s bytes as :func:`erasure.decode_pieces` gives
        them, unjoined and not cached: a restore streaming file data takes a
        blob at a time from them (:func:`packer.blob_bytes`), and joining
        each pack's data shards into one buffer would cost a copy and a page
        fault for every 4 KiB of it."""
        if failures is None:
            failures = []
        # Data shards first: with all of them the decode is views of them.
        # Peers found slow are asked after the others, those down last.
        run = self.run
        candidates = sorted(
            record.shards,
            key=lambda s: (run.is_down(s.peer_id), run.is_slow(s.peer_id), s.index),
        )
        fetched = await race(
            candidates,
            functools.partial(self._fetch_shard, record, failures),
            wanted=record.k,
            patience=READ_PATIENCE,
            overdue=lambda location: run.mark_slow(location.peer_id),
        )
        # Two may have come at once: the data shards first, as above.
        good = {
            location.index: data
            for location, data in sorted(fetched.answers.items(), key=lambda a: a[0].index)[
                : record.k
            ]
        }
        if len(good) < record.k:
            raise NotEnoughShardsError(
                f"pack {record.pack_id.hex()[:16]}: only {len(good)} good shards of the "
                f"{record.k} needed ({'; '.join(f'{f.peer_id}: {f.reason}' for f in failures)})"
            )
        # Each shard matched the Merkle root the index kept, so the decoded
        # bytes are the pack; hashing it again would only slow the restore
        # (docs/performance.md#restore).
        from p2pbackup.core import erasure  # numpy: see the module docstring

        return await trio.to_thread.run_sync(
            erasure.decode_pieces, good, record.k, record.n, record.size
        )

    async def fetch_verified_shard(self, record: PackRecord, location: ShardLocation) -> bytes:
        """One shard's data, checked against its header and Merkle root."""
        raw = await self.store(location.peer_id).get(
            formats.shard_id(record.pack_id, location.index)
        )
        return await trio.to_thread.run_sync(shards.verify_shard, record, location, raw)

    async def _fetch_shard(
        self, record: PackRecord, failures: list[ShardFailure], location: ShardLocation
    ) -> bytes:
        """One verified shard; a failure is noted in ``failures`` and raised again."""
        try:
            return await self.fetch_verified_shard(record, location)
        except ShardNotFoundError:
            failures.append(ShardFailure(location.peer_id, location.index, "missing"))
            raise
        except PeerUnavailableError as exc:
            self.run.mark_down(location.peer_id, str(exc))
            failures.append(ShardFailure(location.peer_id, location.index, str(exc)))
            raise
        except (StoreError, IntegrityError, UsageError) as exc:
            failures.append(ShardFailure(location.peer_id, location.index, str(exc)))
            raise

    async def load_blob(
        self, blob_id: bytes, blob_type: BlobType, *, known: BlobLocation | None = None
    ) -> bytes:
        """The plaintext of a blob, from the first of its packs that can be
        read; ``known``, a location of it looked up already (a restore looks
        up every tree's in one query), is tried before the index is asked."""

        def locations() -> Iterator[BlobLocation]:
            if known is not None:
                yield known
            for location in self.index.blob_locations(blob_id):
                if location != known:
                    yield location

        errors: list[str] = []
        tried = False
        for location in locations():
            tried = True
            # A restore's trees share a few packs: the record (a query and
            # a ShardLocation per shard) is wanted only for a pack not cached.
            data = self._packs.get(location.pack_id)
            try:
                if data is None:
                    record = self.index.pack(location.pack_id, with_blobs=False)
                    if record is None:
                        continue
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
        if not tried:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} is not in the index")
        raise NotEnoughShardsError(f"blob {blob_id.hex()[:16]} cannot be read: {'; '.join(errors)}")

    # -- the root record --------------------------------------------------------

    async def publish_root(self) -> int:
        """Write a new root record to every peer; returns how many took it.
        HomeConflictError if another home of this identity wrote one since
        this home last did, unless this is a takeover."""
        return await rootrecord.publish_root(
            self.index,
            self.keyring,
            self.store,
            time_ns=time.time_ns(),
            takeover=self.takeover,
            settings=self.settings(),
        )

    async def check_writer(self) -> None:
        """HomeConflictError if publishing would be refused (unless this is a
        takeover): asked before work whose end is a new root record."""
        if not self.takeover:
            await rootrecord.check_writer(self.index, self.keyring, self.store)
