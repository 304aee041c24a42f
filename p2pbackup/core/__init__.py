"""Pure primitives: bytes in, bytes or decisions out — no I/O, no clock, no event loop.

Nouns:

* **keys** (:mod:`.keys`) — the master secret, the recovery key that writes it
  down, and every key derived from it; :mod:`.crypto` is the one face of
  libsodium (AEAD, BLAKE2b, Ed25519, X25519).
* **chunk** (:mod:`.chunker`) — a content-defined piece of a file (FastCDC);
  **compression** (:mod:`.compression`) decides zstd or raw per blob.
* **blob** (:mod:`.blobs`) — one sealed, self-checking object; a **pack**
  (:mod:`.packer`) — sealed blobs in one padded, opaque byte string.
* **shard** (:mod:`.erasure`) — one of the n pieces of a pack under a systematic
  k-of-n Reed-Solomon code; its **Merkle root** (:mod:`.merkle`) proves any block.
* **formats** (:mod:`.formats`) — the versioned byte layout of everything
  persisted or replicated; **field checks** (:mod:`.fields`) — the one set of
  checks of decoded msgpack fields, for the formats, the wire's messages and
  the sealer pipe alike.
* **frame** (:mod:`.framing`) — a length-prefixed body in a byte stream, and
  the one reader that cuts a stream into frames.
* **placement** (:mod:`.placement`) — which peer holds which shard;
  **exclude rules** (:mod:`.exclude`) — which paths a backup leaves out.

May import: nothing but the root modules. (The layers, lowest first: core,
net, wire, stores, dht, engine, maintenance, node, app; each imports only
those below it, and ``tests/test_architecture.py`` holds every layer to that.)
"""
