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

It is **published** to every peer after each change; one peer taking it is
enough, since any peer is a way back in.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from p2pbackup.core import crypto, formats
from p2pbackup.core.keys import Keyring
from p2pbackup.engine.index import Index
from p2pbackup.errors import FormatError, IntegrityError, PeerUnavailableError, StoreError
from p2pbackup.model import RootRecord
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


def build_root_record(index: Index, *, time_ns: int) -> RootRecord:
    """The next root record of the repository ``index`` describes, made at
    unix nanosecond ``time_ns``."""
    index_packs = []
    for pack_id in index.pack_ids(is_index=True):
        record = index.pack(pack_id)
        if record is not None:
            index_packs.append(record)
    return RootRecord(
        sequence=index.root_sequence() + 1,
        time_ns=time_ns,
        config=index.config(),
        peers=tuple(index.peers()),
        index_packs=tuple(index_packs),
        snapshots=tuple(sid for sid, _ in index.snapshots()),
        friends=tuple(index.friends()),
    )


async def publish_root(
    index: Index, keyring: Keyring, store: Callable[[str], ShardStore], *, time_ns: int
) -> int:
    """Write a new root record to every peer (each reached through ``store``);
    returns how many took it. PeerUnavailableError if none did."""
    record = build_root_record(index, time_ns=time_ns)
    envelope = seal_root_record(keyring, record)
    stored = 0
    errors: list[str] = []

    async def put(peer_id: str) -> None:
        nonlocal stored
        try:
            await store(peer_id).put_root(envelope)
            stored += 1
        except StoreError as exc:
            errors.append(f"{peer_id}: {exc}")

    async with trio.open_nursery() as nursery:
        for peer in index.peers():
            nursery.start_soon(put, peer.peer_id)
    if stored == 0:
        raise PeerUnavailableError(f"no peer accepted the root record ({'; '.join(errors)})")
    index.set_root_sequence(record.sequence)
    return stored
