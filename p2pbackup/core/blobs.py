"""Blobs: how one piece of plaintext becomes an encrypted, self-checking object.

A **blob** is a data chunk, a tree, a snapshot or an index segment. Its **id**
is the keyed BLAKE2b-256 of its plaintext under the user's dedup key, so the
same plaintext always gets the same id (deduplication) while nobody without
the key can compute or confirm it.

A **sealed blob** is ``seal(data_key, version || method || payload, aad)`` where
``payload`` is the plaintext, zstd-compressed when that saves space, and the
associated data binds the ciphertext to its type and id: a blob moved to
another id, or a tree presented as a chunk, fails to open.
"""

from __future__ import annotations

from p2pbackup.core import compression, crypto
from p2pbackup.errors import FormatError, IntegrityError
from p2pbackup.model import ID_SIZE, BlobType, BytesLike

#: Version byte inside every sealed blob's plaintext.
BLOB_FORMAT_VERSION = 1
#: Bytes a sealed blob adds to its (possibly compressed) payload.
BLOB_OVERHEAD = crypto.SEAL_OVERHEAD + 2
#: No blob's plaintext may exceed this (chunks are at most a few MiB; trees
#: and index segments are bounded by formats' own limits).
MAX_BLOB_SIZE = 256 * 1024 * 1024


def blob_id(dedup_key: bytes, plaintext: BytesLike) -> bytes:
    """The content id of ``plaintext`` for the owner of ``dedup_key``."""
    return crypto.hash_bytes(plaintext, size=ID_SIZE, key=dedup_key)


def _aad(blob_type: BlobType, ident: bytes) -> bytes:
    return b"p2pbackup-blob" + bytes([blob_type]) + ident


def seal_blob(
    data_key: bytes,
    blob_type: BlobType,
    ident: bytes,
    plaintext: BytesLike,
) -> bytes:
    """Compress (when it pays) and encrypt ``plaintext`` as blob ``ident``."""
    method, payload = compression.compress(plaintext)
    inner = b"".join((bytes([BLOB_FORMAT_VERSION, method]), payload))
    return crypto.seal(data_key, inner, aad=_aad(blob_type, ident))


def open_blob(
    data_key: bytes,
    dedup_key: bytes,
    blob_type: BlobType,
    ident: bytes,
    sealed: BytesLike,
    *,
    verify_id: bool = True,
) -> bytes:
    """Decrypt, decompress and check a sealed blob; IntegrityError if anything is off.

    The AEAD tag, whose associated data holds the id, is always checked.
    ``verify_id`` also re-hashes the plaintext against the id: that catches a
    blob sealed under the right key with the wrong id — a bug, not an attack,
    since only the owner holds the key — and ``check --read-data`` does it;
    a restore skips it (a noticeable share of the restore's time:
    docs/performance.md#restore).
    """
    inner = crypto.unseal(data_key, sealed, aad=_aad(blob_type, ident))
    if len(inner) < 2:
        raise FormatError(f"blob {ident.hex()[:16]}: truncated plaintext")
    if inner[0] != BLOB_FORMAT_VERSION:
        raise FormatError(f"blob {ident.hex()[:16]}: unknown version {inner[0]}")
    plaintext = compression.decompress(inner[1], memoryview(inner)[2:], max_size=MAX_BLOB_SIZE)
    if verify_id and blob_id(dedup_key, plaintext) != ident:
        raise IntegrityError(f"blob {ident.hex()[:16]}: content does not match its id")
    return plaintext
