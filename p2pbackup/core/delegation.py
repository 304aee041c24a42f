"""Delegation certificates and repair grants, signed and checked (pure).

Nouns:

* **delegate** — a node the owner chose to keep its backups alive while it
  is away (docs/delegation.md): a friend, or any node the owner knows.
* **delegation certificate** — :class:`~p2pbackup.model.DelegationCertificate`
  in a signed envelope of kind :data:`CERTIFICATE_KIND`: the owner's word,
  signed by its identity key, that one delegate may audit, renew and put
  rebuilt shards in the owner's namespace until an expiry. A storage node
  checks it (:func:`verify_certificate`) against the session's peer and its
  own clock before honouring a delegate's request.
* **repair grant** — :class:`~p2pbackup.model.RepairGrant` in a signed
  envelope of kind :data:`GRANT_KIND`: the shard maps a delegate needs to
  repair the owner's packs, and nothing about what is in them.
* **repair log** — :class:`~p2pbackup.model.RepairLog` in a signed
  envelope of kind :data:`LOG_KIND`, signed by the *delegate*: where the
  shards it rebuilt for an owner are now. The owner takes it as hints: each
  entry names a Merkle root the owner already holds, so a lie costs the
  owner one failed audit, never a wrong byte.
* **sealed** — the envelope's bytes (:mod:`p2pbackup.core.formats`' signed
  envelope, whose domain and kind keep a signature on one from ever being a
  signature on anything else the identity key signs). **Opening** checks the
  layout, that the signer is the owner the payload names, and the signature.

Errors: :class:`~p2pbackup.errors.FormatError` for bytes that do not parse,
:class:`~p2pbackup.errors.SignatureError` for a forgery, and
:class:`~p2pbackup.errors.DelegationError` for a genuine certificate that
grants nothing here (expired, not yet valid, another delegate's or another
owner's). All are integrity errors with a one-line message.

Pure: no I/O, no clock; callers pass ``now`` (unix seconds).
"""

from __future__ import annotations

from p2pbackup.core import crypto, formats
from p2pbackup.core.keys import node_id_for
from p2pbackup.errors import DelegationError, FormatError, IntegrityError
from p2pbackup.model import NODE_ID_SIZE, DelegationCertificate, RepairGrant, RepairLog

#: Envelope kinds (core.formats' signed envelope).
CERTIFICATE_KIND = b"DLGC"
GRANT_KIND = b"GRNT"
LOG_KIND = b"RLOG"
#: How far a certificate's issue time may lie ahead of a checker's clock:
#: clocks of homes differ by this much without anything being wrong.
CLOCK_SKEW = 600
#: The lifetime the owner gives its certificates: a year, as long as the
#: leases a delegate renews, renewed with every grant it hands out. It must
#: outlast the owner's longest absence — months, for a machine stolen or
#: left off — since a delegate needs it most then. A delegate dropped
#: without being told (a node that missed the revocation) keeps its rights
#: that long, and they allow no read of anything but ciphertext, no delete
#: (docs/delegation.md, "Threat model").
CERTIFICATE_LIFETIME = 365 * 86400


def _seal(kind: bytes, identity_seed: bytes, payload: bytes) -> bytes:
    public_key = crypto.signing_public_key(identity_seed)
    signature = crypto.sign(identity_seed, formats.envelope_signed_bytes(kind, public_key, payload))
    return formats.encode_signed_envelope(kind, public_key, payload, signature)


def _open(kind: bytes, what: str, data: bytes) -> tuple[bytes, bytes]:
    """The signer's public key and the payload of a verified envelope of ``kind``."""
    envelope = formats.decode_signed_envelope(data)
    if envelope.kind != kind:
        raise FormatError(f"{what}: an envelope of kind {envelope.kind!r}, not {kind!r}")
    try:
        crypto.verify(envelope.signer_public_key, envelope.signed_bytes(), envelope.signature)
    except IntegrityError as error:
        raise type(error)(f"{what}: {error}") from None
    return envelope.signer_public_key, envelope.payload


# --- Certificates -------------------------------------------------------------


def issue_certificate(
    identity_seed: bytes, delegate: bytes, *, now: int, lifetime: int = CERTIFICATE_LIFETIME
) -> bytes:
    """A sealed certificate, from the owner whose identity seed this is, for
    node ``delegate`` from ``now`` for ``lifetime`` seconds."""
    public_key = crypto.signing_public_key(identity_seed)
    certificate = DelegationCertificate(
        owner=node_id_for(public_key),
        owner_public_key=public_key,
        delegate=bytes(delegate),
        issued_at=now,
        expiry=now + lifetime,
    )
    payload = formats.encode_delegation_certificate(certificate)
    return _seal(CERTIFICATE_KIND, identity_seed, payload)


def open_certificate(data: bytes) -> DelegationCertificate:
    """The certificate in ``data``, if it parses and its owner signed it."""
    what = "delegation certificate"
    signer, payload = _open(CERTIFICATE_KIND, what, data)
    certificate = formats.decode_delegation_certificate(payload)
    if certificate.owner_public_key != signer:
        raise FormatError(f"{what}: signed by another key than the owner's it names")
    return certificate


def check_certificate(
    certificate: DelegationCertificate,
    *,
    now: int,
    delegate: bytes,
    owner: bytes | None = None,
) -> None:
    """Whether ``certificate`` lets node ``delegate`` act now (for ``owner``,
    if given); :class:`DelegationError` saying why not."""
    who = f"the delegation certificate of node {certificate.owner.hex()}"
    if owner is not None and certificate.owner != owner:
        raise DelegationError(f"{who} is not one of node {owner.hex()}")
    if certificate.delegate != delegate:
        raise DelegationError(
            f"{who} names node {certificate.delegate.hex()} as its delegate, "
            f"not node {delegate.hex()}"
        )
    if certificate.issued_at > now + CLOCK_SKEW:
        raise DelegationError(f"{who} is issued at {certificate.issued_at}, after now ({now})")
    if certificate.expiry <= now:
        raise DelegationError(f"{who} expired at {certificate.expiry} (now {now})")


def verify_certificate(
    data: bytes, *, now: int, delegate: bytes, owner: bytes | None = None
) -> DelegationCertificate:
    """The certificate in ``data`` if it is genuine and lets ``delegate`` act now."""
    if len(delegate) != NODE_ID_SIZE:
        raise ValueError(f"a node id is {NODE_ID_SIZE} bytes, not {len(delegate)}")
    certificate = open_certificate(data)
    check_certificate(certificate, now=now, delegate=delegate, owner=owner)
    return certificate


# --- Repair grants --------------------------------------------------------------


def seal_grant(identity_seed: bytes, grant: RepairGrant) -> bytes:
    """The grant signed by the owner whose identity seed this is (it must be
    the grant's owner)."""
    if node_id_for(crypto.signing_public_key(identity_seed)) != grant.owner:
        raise FormatError("repair grant: signed by another key than its owner's")
    return _seal(GRANT_KIND, identity_seed, formats.encode_repair_grant(grant))


def open_grant(data: bytes, *, owner: bytes | None = None) -> RepairGrant:
    """The grant in ``data``, if it parses and its owner (``owner``, if given)
    signed it."""
    what = "repair grant"
    signer, payload = _open(GRANT_KIND, what, data)
    grant = formats.decode_repair_grant(payload)
    if node_id_for(signer) != grant.owner:
        raise FormatError(f"{what}: signed by another key than its owner's")
    if owner is not None and grant.owner != owner:
        raise DelegationError(f"{what}: of node {grant.owner.hex()}, not of node {owner.hex()}")
    return grant


# --- Repair logs ------------------------------------------------------------------


def seal_log(identity_seed: bytes, log: RepairLog) -> bytes:
    """The log signed by the delegate whose identity seed this is (it must be
    the log's delegate)."""
    if node_id_for(crypto.signing_public_key(identity_seed)) != log.delegate:
        raise FormatError("repair log: signed by another key than its delegate's")
    return _seal(LOG_KIND, identity_seed, formats.encode_repair_log(log))


def open_log(data: bytes, *, delegate: bytes, owner: bytes) -> RepairLog:
    """The log in ``data``, if node ``delegate`` signed it and it is about
    ``owner``'s shards."""
    what = "repair log"
    signer, payload = _open(LOG_KIND, what, data)
    log = formats.decode_repair_log(payload)
    if node_id_for(signer) != log.delegate:
        raise FormatError(f"{what}: signed by another key than its delegate's")
    if log.delegate != delegate or log.owner != owner:
        raise DelegationError(
            f"{what}: of node {log.delegate.hex()} for node {log.owner.hex()}, "
            f"not of node {delegate.hex()} for node {owner.hex()}"
        )
    return log
