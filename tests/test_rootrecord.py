"""The root record as peers store it: sealed, signed and padded."""

from __future__ import annotations

import random
from pathlib import Path

import attrs
import msgpack

from p2pbackup.core import crypto, formats
from p2pbackup.core.keys import Keyring
from p2pbackup.engine import rootrecord
from p2pbackup.engine.index import Index
from p2pbackup.model import (
    BlobEntry,
    BlobType,
    PackRecord,
    PeerRecord,
    RepositoryConfig,
    RootRecord,
    ShardLocation,
)

KEYRING = Keyring.from_master_secret(bytes(range(32)))
CONFIG = RepositoryConfig(3, 6, 12 << 20, 256 << 10, 832 << 10, 4 << 20, 65536)
PEERS = tuple(PeerRecord(f"{i:040x}", "node", f"192.0.2.{i}:4747") for i in range(6))


def index_pack(rng: random.Random) -> PackRecord:
    """An index pack as a backup writes one: six shards on nodes, one blob."""
    return PackRecord(
        pack_id=rng.randbytes(32),
        size=48 << 10,
        k=3,
        n=6,
        shard_size=16 << 10,
        block_size=65536,
        shards=tuple(ShardLocation(i, PEERS[i].peer_id, rng.randbytes(32)) for i in range(6)),
        blobs=(BlobEntry(BlobType.INDEX, rng.randbytes(32), 0, 2000, 1960),),
    )


def record_after(backups: int) -> RootRecord:
    """The root record of a home after ``backups`` backups and no prune."""
    rng = random.Random(backups)
    return RootRecord(
        sequence=backups,
        time_ns=1_800_000_000 * 10**9,
        config=CONFIG,
        peers=PEERS,
        index_packs=tuple(index_pack(rng) for _ in range(backups)),
        snapshots=tuple(rng.randbytes(32) for _ in range(backups)),
        instance=rng.randbytes(16),
    )


def test_the_stored_size_does_not_count_snapshots() -> None:
    sizes = {
        backups: len(rootrecord.seal_root_record(KEYRING, record_after(backups)))
        for backups in (0, 1, 2, 10, 50, 90)
    }
    # Each backup adds an index pack and a snapshot id (about 600 bytes with
    # six node peers): none of that shows below the first bucket's end.
    assert set(sizes.values()) == {rootrecord.ROOT_RECORD_MIN_SIZE}, sizes
    # Beyond it the size doubles: it shows the count only as which doubling.
    assert len(rootrecord.seal_root_record(KEYRING, record_after(120))) == 2 * (64 << 10)


def test_a_sealed_record_opens_to_itself() -> None:
    record = record_after(3)
    assert rootrecord.open_root_record(KEYRING, rootrecord.seal_root_record(KEYRING, record)) == (
        record
    )


def test_a_record_stored_before_padding_and_instance_ids_still_opens() -> None:
    record = attrs.evolve(record_after(2), instance=b"")
    body = msgpack.unpackb(formats.encode_root_record(record)[5:])
    plain = b"P2PR\x01" + msgpack.packb(body[:7], use_bin_type=True)
    payload = crypto.seal(KEYRING.record_key, plain, aad=b"p2pbackup-root" + KEYRING.node_id)
    signed = formats.envelope_signed_bytes(b"ROOT", KEYRING.identity_public, payload)
    envelope = formats.encode_signed_envelope(
        b"ROOT", KEYRING.identity_public, payload, crypto.sign(KEYRING.identity_seed, signed)
    )
    assert len(envelope) < 4096  # as it was: unpadded
    assert rootrecord.open_root_record(KEYRING, envelope) == record


def test_a_record_is_foreign_when_another_home_wrote_it_after_our_last(
    tmp_path: Path,
) -> None:
    index = Index(tmp_path / "index.sqlite")
    ours, theirs, other = b"o" * 16, b"t" * 16, b"x" * 16

    def foreign(*records: tuple[int, bytes]) -> bool:
        found = {
            f"peer{i}": attrs.evolve(record_after(0), sequence=sequence, instance=writer)
            for i, (sequence, writer) in enumerate(records)
        }
        return rootrecord.foreign_record(found, index, ours) is not None

    # A new home (no record yet) finds one: another home wrote it.
    assert foreign((1, theirs))
    # Recovered from their #5: that record and older ones are not foreign,
    # a newer one of theirs, or another #5, is.
    index.set_root(5, theirs)
    assert not foreign((5, theirs), (4, other), (3, b""))
    assert foreign((5, theirs), (6, theirs))
    assert foreign((5, other))
    # Our own records never are, even numbered above our last (a put that
    # timed out may have landed).
    index.set_root(7, ours)
    assert not foreign((7, ours), (8, ours), (6, theirs))
    assert foreign((7, theirs))
    # A home from before instance ids, among records from before them.
    index.set_root(9, b"")
    assert not foreign((9, b""), (8, b""))
    assert foreign((10, b""))
    index.close()
