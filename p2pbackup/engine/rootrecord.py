"""The root record: what a new home needs to find everything again.

* **root record** — the repository's config, peers and friends, its index
  packs and the ids of its live snapshots (:class:`~p2pbackup.model.RootRecord`),
  built from the index with the next **sequence** number, so that the newest
  of the copies found wins.
* **signed envelope** — how it is stored: the record sealed with the record
  key (only the owner reads it), in an envelope signed by the identity key
  (a peer cannot pass off a record of its own).
* **padding** — zeros inside the seal, so that the envelope a peer stores is
  :data:`ROOT_RECORD_MIN_SIZE` bytes, or that doubled as often as the record
  needs (:func:`envelope_size`): its size does not count snapshots, packs or
  peers until there are hundreds of them (docs/privacy.md).
* **instance id** — 16 random bytes naming one home, one copy of an
  identity on one machine: made at its first root record and kept in its
  index (:func:`home_instance`). A record carries its **writer**'s.
* **foreign record** — a record on a peer that another home of this identity
  wrote after the last one this home wrote or took over (at ``recover``):
  newer than that one, or as new but by another writer. A home that finds
  one refuses to write (:class:`~p2pbackup.errors.HomeConflictError`): its
  record would drop the other home's snapshots from what every peer holds.
  A **takeover** (``backup --takeover``) writes anyway, numbered above
  every record found, and the other home is then the one that refuses.

It is **published** to every peer after each change, once the peers' records
are read and none is foreign; one peer taking it is enough, since any peer
is a way back in.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping

import trio

from p2pbackup.core import crypto, formats
from p2pbackup.core.keys import Keyring
from p2pbackup.engine.index import Index
from p2pbackup.errors import (
    FormatError,
    HomeConflictError,
    IntegrityError,
    PeerUnavailableError,
    StoreError,
)
from p2pbackup.model import INSTANCE_ID_SIZE, RootRecord
from p2pbackup.stores.shardstore import ShardStore

ROOT_ENVELOPE_KIND = b"ROOT"
#: The smallest stored root record: the envelope of a record naming up to
#: about a hundred snapshots' index packs (docs/privacy.md).
ROOT_RECORD_MIN_SIZE = 64 * 1024
#: What the envelope adds to the record: its head, the seal and the signature.
_ENVELOPE_OVERHEAD = (
    len(formats.encode_signed_envelope(ROOT_ENVELOPE_KIND, bytes(32), b"", bytes(64)))
    + crypto.SEAL_OVERHEAD
)


def envelope_size(record_length: int) -> int:
    """The size the envelope of an encoded record of ``record_length`` bytes
    is padded to: the minimum, doubled until the record fits."""
    size = ROOT_RECORD_MIN_SIZE
    while size < record_length + _ENVELOPE_OVERHEAD:
        size *= 2
    return size


def seal_root_record(keyring: Keyring, record: RootRecord) -> bytes:
    """The signed, encrypted and padded envelope stored on every peer."""
    plain = formats.encode_root_record(record)
    padded = formats.encode_root_record(
        record, padded_size=envelope_size(len(plain)) - _ENVELOPE_OVERHEAD
    )
    payload = crypto.seal(keyring.record_key, padded, aad=b"p2pbackup-root" + keyring.node_id)
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


def home_instance(index: Index) -> bytes:
    """This home's instance id, made now if it has none yet."""
    instance = index.instance()
    if instance is None:
        instance = crypto.random_bytes(INSTANCE_ID_SIZE)
        with index.transaction():
            index.set_instance(instance)
    return instance


def build_root_record(
    index: Index,
    *,
    time_ns: int,
    sequence: int | None = None,
    instance: bytes = b"",
    settings: bytes = b"",
) -> RootRecord:
    """The next root record of the repository ``index`` describes, made at
    unix nanosecond ``time_ns`` by the home ``instance``, carrying the
    home's ``settings``; numbered ``sequence`` (default: the one after the
    last)."""
    index_packs = []
    for pack_id in index.pack_ids(is_index=True):
        record = index.pack(pack_id)
        if record is not None:
            index_packs.append(record)
    return RootRecord(
        sequence=index.root_sequence() + 1 if sequence is None else sequence,
        time_ns=time_ns,
        config=index.config(),
        peers=tuple(index.peers()),
        index_packs=tuple(index_packs),
        snapshots=tuple(sid for sid, _ in index.snapshots()),
        friends=tuple(index.friends()),
        instance=instance,
        settings=settings,
        names=tuple(sorted(index.peer_names().items())),
        delegates=tuple(sorted(row.node_id for row in index.delegates())),
    )


def foreign_record(
    found: Mapping[str, RootRecord], index: Index, instance: bytes
) -> tuple[str, RootRecord] | None:
    """A foreign record among the records ``found`` on each peer (module
    docstring), and the peer it is on; None if there is none.

    A record of this home's own numbered above its last one is not foreign:
    a put that timed out may still have landed.
    """
    last, writer = index.root_sequence(), index.root_writer()
    for peer_id, record in sorted(found.items(), key=lambda item: -item[1].sequence):
        if record.instance == instance:
            continue
        if record.sequence > last or (record.sequence == last and record.instance != writer):
            return peer_id, record
    return None


def _conflict(peer_id: str, record: RootRecord, index: Index) -> HomeConflictError:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(record.time_ns // 10**9))
    return HomeConflictError(
        f"another home with this recovery key wrote root record #{record.sequence} "
        f"(on peer {peer_id}, {when}) after this home's #{index.root_sequence()}; "
        "writing now would drop that home's snapshots: keep one home, and if it is "
        "this one run `p2pbackup backup --takeover PATH...` here",
        peer_id=peer_id,
        sequence=record.sequence,
    )


async def read_roots(
    peer_ids: Iterable[str], keyring: Keyring, store: Callable[[str], ShardStore]
) -> tuple[dict[str, RootRecord], dict[str, str]]:
    """The root record each peer holds for us, read from all at once, and
    for each peer that could not be reached, why. A peer holding none, or
    one that does not open, is in neither: it holds nothing of ours."""
    found: dict[str, RootRecord] = {}
    unreachable: dict[str, str] = {}

    async def read(peer_id: str) -> None:
        try:
            raw = await store(peer_id).get_root()
        except PeerUnavailableError as exc:
            unreachable[peer_id] = str(exc)
            return
        except StoreError:
            return
        if raw is None:
            return
        # Damaged, or not ours: ours replaces it.
        with contextlib.suppress(IntegrityError):
            found[peer_id] = open_root_record(keyring, raw)

    async with trio.open_nursery() as nursery:
        for peer_id in peer_ids:
            nursery.start_soon(read, peer_id)
    return found, unreachable


async def check_writer(index: Index, keyring: Keyring, store: Callable[[str], ShardStore]) -> None:
    """HomeConflictError if a peer holds a foreign record (module docstring)."""
    found, _ = await read_roots((p.peer_id for p in index.peers()), keyring, store)
    conflict = foreign_record(found, index, home_instance(index))
    if conflict is not None:
        raise _conflict(*conflict, index)


async def publish_root(
    index: Index,
    keyring: Keyring,
    store: Callable[[str], ShardStore],
    *,
    time_ns: int,
    takeover: bool = False,
    settings: bytes = b"",
) -> int:
    """Write a new root record to every peer (each reached through ``store``)
    that could be read, unless one holds a foreign record and this is no
    ``takeover`` (module docstring); returns how many took it.
    PeerUnavailableError if none did."""
    instance = home_instance(index)
    peer_ids = [peer.peer_id for peer in index.peers()]
    found, unreachable = await read_roots(peer_ids, keyring, store)
    conflict = foreign_record(found, index, instance)
    if conflict is not None and not takeover:
        raise _conflict(*conflict, index)
    # Above every record found: the newest is what a recovering home takes.
    sequence = max([index.root_sequence(), *(r.sequence for r in found.values())]) + 1
    record = build_root_record(
        index, time_ns=time_ns, sequence=sequence, instance=instance, settings=settings
    )
    envelope = seal_root_record(keyring, record)
    stored = 0
    errors = [f"{peer_id}: {problem}" for peer_id, problem in sorted(unreachable.items())]

    async def put(peer_id: str) -> None:
        nonlocal stored
        try:
            await store(peer_id).put_root(envelope)
            stored += 1
        except StoreError as exc:
            errors.append(f"{peer_id}: {exc}")

    async with trio.open_nursery() as nursery:
        for peer_id in peer_ids:
            if peer_id not in unreachable:
                nursery.start_soon(put, peer_id)
    if stored == 0:
        raise PeerUnavailableError(f"no peer accepted the root record ({'; '.join(errors)})")
    with index.transaction():
        index.set_root(record.sequence, instance)
    return stored
