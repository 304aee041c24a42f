"""The one exception tree of p2pbackup.

Every error the package raises on purpose derives from :class:`P2PBackupError`;
the CLI prints ``str(error)`` as one line and exits non-zero, so each message
must name what is wrong in words a user understands.

Families:

* :class:`UsageError` — the user asked for something impossible (a path that
  does not exist, an unknown snapshot, a home that is not initialised);
  :class:`HomeConflictError` when another home of the same identity writes
  the root record.
* :class:`RecoveryKeyError` — a recovery key that does not parse or whose
  checksum fails; says which group holds the typo when that can be known.
* :class:`IntegrityError` — bytes that fail verification: a failed AEAD tag,
  a bad signature, a wrong Merkle root, a malformed persisted structure.
  Integrity errors are never "fixed" by retrying the same source.
* :class:`FormatError` (an integrity error) — a persisted or transmitted
  structure that does not parse: bad magic, unknown version, truncation,
  absurd sizes.
* :class:`RecordKeyError`, :class:`RecordExpiredError` (integrity errors) — a
  DHT record that is not its claimed node's, or is out of date.
* :class:`DelegationError` (an integrity error) — a genuine delegation
  certificate or repair grant that grants nothing here: expired, not yet
  valid, revoked, another delegate's or another owner's.
* :class:`ErasureError` — misuse of the erasure code (unequal shard lengths,
  a shard index out of range, bad k/n); :class:`NotEnoughShardsError` when
  fewer than k usable shards exist.
* :class:`StoreError` — a shard store refused or failed an operation;
  :class:`ShardNotFoundError` when the shard is simply absent,
  :class:`StoreFullError` when the store has no room,
  :class:`StoreRequestError` when the request itself is unreasonable.
* :class:`ProtocolError` — the wire: :class:`LocalProtocolError` (we broke the
  rules) and :class:`RemoteProtocolError` (the peer did).
  :class:`HandshakeError` (a remote protocol error) when the secure session's
  handshake fails; :class:`PeerAuthenticationError` when the peer's identity
  proof is bad, :class:`PeerIdentityError` when the peer is another node than
  the one dialled. :class:`KeyAgreementError` (an integrity error) for an
  unusable X25519 public key.
* :class:`PeerUnavailableError` — a peer that cannot be reached now.
* :class:`PortMappingError` — the home router forwards no port: it refused,
  did not answer, or answered nonsense; the message says which.
"""

from __future__ import annotations


class P2PBackupError(Exception):
    """Root of every error p2pbackup raises on purpose."""


class UsageError(P2PBackupError):
    """The user asked for something that cannot be done as asked."""


class RepositoryLockedError(UsageError):
    """Another process holds the home directory's lock."""

    def __init__(self, message: str, *, holder: str | None = None) -> None:
        super().__init__(message)
        #: The pid the holder wrote into the lock file, if known.
        self.holder = holder


class HomeConflictError(UsageError):
    """Another home with the same recovery key wrote the root record since
    this home last did: writing now would drop that home's snapshots."""

    def __init__(self, message: str, *, peer_id: str, sequence: int) -> None:
        super().__init__(message)
        #: The peer holding the other home's record, and that record's number.
        self.peer_id = peer_id
        self.sequence = sequence


class RecoveryKeyError(P2PBackupError):
    """A recovery key that does not parse or fails its checksum."""

    def __init__(self, message: str, *, group: int | None = None) -> None:
        super().__init__(message)
        #: 1-based number of the group that holds the typo, when known.
        self.group = group


class IntegrityError(P2PBackupError):
    """Bytes that failed verification (AEAD, signature, hash, Merkle root)."""


class DecryptionError(IntegrityError):
    """An AEAD open failed: tampered, truncated, or the wrong key."""


class SignatureError(IntegrityError):
    """A signature does not verify under the expected public key."""


class MerkleError(IntegrityError):
    """A block or proof does not match the expected Merkle root."""


class FormatError(IntegrityError):
    """A persisted or transmitted structure that does not parse."""


class RecordKeyError(IntegrityError):
    """A DHT record that is not its claimed node's: the node id is not the hash
    of the public key, or the record sits under another node's (or kind's) key."""


class RecordExpiredError(IntegrityError):
    """A DHT record whose expiry has passed, or lies absurdly far in the future."""


class DelegationError(IntegrityError):
    """A delegation certificate or repair grant that is genuine but grants
    nothing here: expired, not yet valid, revoked, or for another delegate
    or owner."""


class ErasureError(P2PBackupError):
    """The erasure code was called with inconsistent arguments."""


class NotEnoughShardsError(ErasureError):
    """Fewer than k usable shards remain for a pack."""


class StoreError(P2PBackupError):
    """A shard store failed or refused an operation."""


class StoreRequestError(StoreError):
    """A request a store cannot take as asked: a bad size, block size or range,
    an audit of blocks the shard does not have. The asker's fault, not the store's."""


class ShardNotFoundError(StoreError):
    """The store does not hold the requested shard."""


class StoreFullError(StoreError):
    """The store has no room (quota or disk) for the shard."""


class PeerUnavailableError(StoreError):
    """A peer cannot be reached now."""


class PortMappingError(P2PBackupError):
    """The home router did not forward a port: it refused, or it does not map ports."""


class ProtocolError(P2PBackupError):
    """Something broke the rules of the wire protocol."""


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (a bug or misuse on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the session with it is closed."""


class KeyAgreementError(IntegrityError):
    """An X25519 public key that cannot be used: wrong size or a low-order point."""


class HandshakeError(RemoteProtocolError):
    """The peer's secure-session handshake was malformed or failed to authenticate."""


class PeerAuthenticationError(HandshakeError):
    """The peer's identity proof in the handshake is missing, malformed or forged."""


class PeerIdentityError(HandshakeError):
    """The peer authenticated as another node than the one we meant to reach."""
