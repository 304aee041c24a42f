"""Delegation certificates and repair grants: round trips, what a checker
refuses, and sealed bytes that never survive a truncation or a flipped bit."""

from __future__ import annotations

import attrs
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pbackup.core import crypto, delegation, formats
from p2pbackup.core.keys import node_id_for
from p2pbackup.errors import DelegationError, FormatError, IntegrityError, SignatureError
from p2pbackup.model import (
    DelegationCertificate,
    GrantPack,
    GrantPeer,
    GrantShard,
    LogEntry,
    RepairGrant,
    RepairLog,
)

OWNER_SEED = bytes(range(32))
OWNER_KEY = crypto.signing_public_key(OWNER_SEED)
OWNER = node_id_for(OWNER_KEY)
DELEGATE = bytes([7]) * 20
NOW = 1_800_000_000

seeds = st.binary(min_size=32, max_size=32)
node_ids = st.binary(min_size=20, max_size=20)
ids = st.binary(min_size=32, max_size=32)
block_sizes = st.sampled_from([1 << e for e in range(9, 21)])


@st.composite
def grant_packs(draw: st.DrawFn, peers: int) -> GrantPack:
    k = draw(st.integers(1, 20))
    n = draw(st.integers(k + 1, 30))
    indices = sorted(draw(st.sets(st.integers(0, n - 1), max_size=5))) if peers else []
    size = draw(st.integers(0, formats.MAX_PACK_SIZE))
    return GrantPack(
        pack_id=draw(ids),
        size=size,
        k=k,
        n=n,
        shard_size=-(-size // k),
        block_size=draw(block_sizes),
        shards=tuple(
            GrantShard(index, draw(st.integers(0, peers - 1)), draw(ids)) for index in indices
        ),
    )


@st.composite
def grants(draw: st.DrawFn, owner: bytes = OWNER) -> RepairGrant:
    peer_ids = sorted(draw(st.sets(node_ids.filter(lambda i: i != owner), max_size=4)))
    addresses = st.lists(st.text(min_size=1, max_size=20), max_size=3).map(tuple)
    packs = draw(st.lists(grant_packs(len(peer_ids)), max_size=4, unique_by=lambda p: p.pack_id))
    return RepairGrant(
        owner=owner,
        sequence=draw(st.integers(0, 2**40)),
        issued_at=draw(st.integers(0, 2**40)),
        peers=tuple(GrantPeer(node_id, draw(addresses)) for node_id in peer_ids),
        packs=tuple(sorted(packs, key=lambda p: p.pack_id)),
        delegates=tuple(sorted(draw(st.sets(node_ids.filter(lambda i: i != owner), max_size=3)))),
    )


DELEGATE_SEED = bytes([9]) * 32
DELEGATE_ID = node_id_for(crypto.signing_public_key(DELEGATE_SEED))


@st.composite
def logs(draw: st.DrawFn) -> RepairLog:
    keys = draw(st.sets(st.tuples(ids, st.integers(0, 254)), max_size=5))
    return RepairLog(
        delegate=DELEGATE_ID,
        owner=OWNER,
        grant_sequence=draw(st.integers(0, 2**40)),
        made_at=draw(st.integers(0, 2**40)),
        entries=tuple(
            LogEntry(pack_id, index, draw(node_ids), draw(ids)) for pack_id, index in sorted(keys)
        ),
        acted_at=draw(st.integers(0, 2**40)),
    )


def _sealed_certificate() -> bytes:
    return delegation.issue_certificate(OWNER_SEED, DELEGATE, now=NOW, lifetime=86400)


# --- Round trips ---------------------------------------------------------------------


@given(seeds, node_ids, st.integers(0, 2**40), st.integers(1, formats.MAX_CERTIFICATE_LIFETIME))
def test_certificate_round_trip(seed: bytes, delegate: bytes, now: int, lifetime: int) -> None:
    owner = node_id_for(crypto.signing_public_key(seed))
    if owner == delegate:
        return
    sealed = delegation.issue_certificate(seed, delegate, now=now, lifetime=lifetime)
    certificate = delegation.verify_certificate(sealed, now=now, delegate=delegate, owner=owner)
    assert certificate == DelegationCertificate(
        owner, crypto.signing_public_key(seed), delegate, now, now + lifetime
    )
    assert (
        formats.decode_delegation_certificate(formats.encode_delegation_certificate(certificate))
        == certificate
    )


@given(grants())
@settings(max_examples=50)
def test_grant_round_trip(grant: RepairGrant) -> None:
    encoded = formats.encode_repair_grant(grant)
    assert formats.decode_repair_grant(encoded) == grant
    assert delegation.open_grant(delegation.seal_grant(OWNER_SEED, grant), owner=OWNER) == grant


# --- Every truncation, every flipped bit ---------------------------------------------


def _all_damaged(sealed: bytes) -> list[bytes]:
    truncated = [sealed[:cut] for cut in range(len(sealed))]
    flipped = [
        sealed[:i] + bytes([sealed[i] ^ (1 << bit)]) + sealed[i + 1 :]
        for i in range(len(sealed))
        for bit in range(8)
    ]
    return truncated + flipped


def _one_line_refusal(open_: object, damaged: bytes) -> None:
    with pytest.raises(IntegrityError) as caught:
        open_(damaged)  # type: ignore[operator]
    assert "\n" not in str(caught.value) and str(caught.value)


def test_every_damaged_certificate_is_refused() -> None:
    sealed = _sealed_certificate()
    for damaged in _all_damaged(sealed):
        _one_line_refusal(delegation.open_certificate, damaged)
    assert delegation.open_certificate(sealed).delegate == DELEGATE


@given(grants())
@settings(max_examples=5, deadline=None)
def test_every_damaged_grant_is_refused(grant: RepairGrant) -> None:
    sealed = delegation.seal_grant(OWNER_SEED, grant)
    for damaged in _all_damaged(sealed):
        _one_line_refusal(delegation.open_grant, damaged)


@given(logs())
@settings(max_examples=5, deadline=None)
def test_logs_round_trip_and_every_damaged_log_is_refused(log: RepairLog) -> None:
    sealed = delegation.seal_log(DELEGATE_SEED, log)
    assert delegation.open_log(sealed, delegate=DELEGATE_ID, owner=OWNER) == log

    def open_(data: bytes) -> RepairLog:
        return delegation.open_log(data, delegate=DELEGATE_ID, owner=OWNER)

    for damaged in _all_damaged(sealed):
        _one_line_refusal(open_, damaged)


def test_a_version_1_log_reads_as_one_that_says_no_pass() -> None:
    entry = LogEntry(bytes(32), 1, bytes(20), bytes(32))
    log = RepairLog(DELEGATE_ID, OWNER, 1, NOW, (entry,), acted_at=NOW - 60)
    encoded = formats.encode_repair_log(log)
    assert encoded[4] == formats.LOG_VERSION == 2
    body = msgpack.unpackb(encoded[5:])
    old = b"P2PL\x01" + msgpack.packb(body[:5], use_bin_type=True)
    assert formats.decode_repair_log(old) == attrs.evolve(log, acted_at=0)
    with pytest.raises(FormatError, match="expected 5 fields, got 6"):
        formats.decode_repair_log(b"P2PL\x01" + msgpack.packb(body, use_bin_type=True))
    with pytest.raises(FormatError, match="expected 6 fields, got 5"):
        formats.decode_repair_log(b"P2PL\x02" + msgpack.packb(body[:5], use_bin_type=True))


def test_a_log_of_another_delegate_or_owner_is_refused() -> None:
    log = RepairLog(DELEGATE_ID, OWNER, 1, NOW, ())
    sealed = delegation.seal_log(DELEGATE_SEED, log)
    with pytest.raises(DelegationError, match="not of node"):
        delegation.open_log(sealed, delegate=bytes(20), owner=OWNER)
    with pytest.raises(DelegationError, match="not of node"):
        delegation.open_log(sealed, delegate=DELEGATE_ID, owner=bytes(20))
    with pytest.raises(FormatError, match="another key"):
        delegation.seal_log(OWNER_SEED, log)
    twice = LogEntry(bytes(32), 1, bytes(20), bytes(32))
    with pytest.raises(FormatError, match="duplicated"):
        formats.encode_repair_log(attrs.evolve(log, entries=(twice, twice)))


@given(grants())
@settings(max_examples=30)
def test_truncated_grant_bodies_are_format_errors(grant: RepairGrant) -> None:
    encoded = formats.encode_repair_grant(grant)
    for cut in range(len(encoded)):
        with pytest.raises(FormatError):
            formats.decode_repair_grant(encoded[:cut])


@given(st.binary(max_size=300))
def test_hostile_bytes_only_ever_raise_integrity_errors(data: bytes) -> None:
    for open_ in (delegation.open_certificate, delegation.open_grant):
        with pytest.raises(IntegrityError):
            open_(data)
    for decode in (formats.decode_delegation_certificate, formats.decode_repair_grant):
        try:
            decode(formats.CERTIFICATE_MAGIC + b"\x01" + data)
            decode(formats.GRANT_MAGIC + b"\x01" + data)
        except FormatError:
            pass


# --- What a checker refuses ------------------------------------------------------------


def test_a_certificate_is_refused_when_expired_early_or_misdirected() -> None:
    sealed = _sealed_certificate()
    check = delegation.verify_certificate
    assert check(sealed, now=NOW, delegate=DELEGATE, owner=OWNER).expiry == NOW + 86400
    with pytest.raises(DelegationError, match="expired"):
        check(sealed, now=NOW + 86400, delegate=DELEGATE)
    with pytest.raises(DelegationError, match="after now"):
        check(sealed, now=NOW - delegation.CLOCK_SKEW - 1, delegate=DELEGATE)
    with pytest.raises(DelegationError, match="as its delegate"):
        check(sealed, now=NOW, delegate=bytes(20))
    with pytest.raises(DelegationError, match="is not one of node"):
        check(sealed, now=NOW, delegate=DELEGATE, owner=bytes(20))


def test_a_certificate_signed_by_another_key_is_refused() -> None:
    """A forger re-signs the owner's certificate with its own key: the
    certificate still names the owner's key, so it no longer verifies as
    the owner's; with its own key named, it is a certificate of the forger."""
    forger_seed = bytes(32)
    payload = delegation.open_certificate(_sealed_certificate())
    # A forgery, built on purpose with the module's own sealing.
    forged = delegation._seal(
        delegation.CERTIFICATE_KIND,
        forger_seed,
        formats.encode_delegation_certificate(payload),
    )
    with pytest.raises(FormatError, match="another key"):
        delegation.open_certificate(forged)
    # The owner's signature moved onto other bytes fails.
    longer = formats.encode_delegation_certificate(attrs.evolve(payload, expiry=payload.expiry + 1))
    signature = _sealed_certificate()[-crypto.SIGNATURE_SIZE :]
    tampered = formats.encode_signed_envelope(
        delegation.CERTIFICATE_KIND, OWNER_KEY, longer, signature
    )
    with pytest.raises(SignatureError):
        delegation.open_certificate(tampered)


def test_an_owner_cannot_delegate_to_itself_or_for_too_long() -> None:
    with pytest.raises(FormatError, match="its own delegate"):
        delegation.issue_certificate(OWNER_SEED, OWNER, now=NOW)
    with pytest.raises(FormatError, match="valid for"):
        delegation.issue_certificate(
            OWNER_SEED, DELEGATE, now=NOW, lifetime=formats.MAX_CERTIFICATE_LIFETIME + 1
        )


def test_a_grant_of_another_owner_is_refused() -> None:
    grant = RepairGrant(OWNER, 1, NOW, (), ())
    sealed = delegation.seal_grant(OWNER_SEED, grant)
    with pytest.raises(DelegationError, match="not of node"):
        delegation.open_grant(sealed, owner=bytes(20))
    with pytest.raises(FormatError, match="another key"):
        delegation.seal_grant(bytes(32), grant)


def test_a_grant_is_canonical() -> None:
    peers = (GrantPeer(bytes([1]) * 20, ("a:1",)), GrantPeer(bytes([2]) * 20, ()))
    pack = GrantPack(bytes(32), 200, 2, 4, 100, 4096, (GrantShard(0, 0, bytes(32)),))
    with pytest.raises(FormatError, match="out of order"):
        formats.encode_repair_grant(RepairGrant(OWNER, 1, NOW, peers[::-1], ()))
    with pytest.raises(FormatError, match="duplicated"):
        formats.encode_repair_grant(RepairGrant(OWNER, 1, NOW, peers, (pack, pack)))
    bad_peer = attrs.evolve(pack, shards=(GrantShard(0, 2, bytes(32)),))
    with pytest.raises(FormatError, match="out of range"):
        formats.encode_repair_grant(RepairGrant(OWNER, 1, NOW, peers, (bad_peer,)))
    bad_index = attrs.evolve(pack, shards=(GrantShard(4, 0, bytes(32)),))
    with pytest.raises(FormatError, match="not below n"):
        formats.encode_repair_grant(RepairGrant(OWNER, 1, NOW, peers, (bad_index,)))
    with pytest.raises(FormatError, match="does not fit pack size"):
        formats.encode_repair_grant(
            RepairGrant(OWNER, 1, NOW, peers, (attrs.evolve(pack, shard_size=99),))
        )
    with pytest.raises(FormatError, match="its own delegate"):
        formats.encode_repair_grant(RepairGrant(OWNER, 1, NOW, (), (), (OWNER,)))
    with pytest.raises(FormatError, match="out of order"):
        formats.encode_repair_grant(RepairGrant(OWNER, 1, NOW, (), (), (b"b" * 20, b"a" * 20)))
    with pytest.raises(FormatError, match="its own shards"):
        formats.encode_repair_grant(RepairGrant(OWNER, 1, NOW, (GrantPeer(OWNER, ()),), ()))
