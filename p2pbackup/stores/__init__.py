"""Where shards live: one interface, and the stores behind it.

Nouns:

* **shard store** (:mod:`.shardstore`) — one owner's namespace on one peer:
  put, get, list, delete shards and the owner's root record; the interface
  every store implements, its values (space, shard root) and the argument
  checks they share. Every store passes the one conformance suite
  (``tests/storage_conformance.py``).
* **folder store** (:mod:`.folder`) — a local folder (an external disk, a
  mounted share) laid out as a peer.
* **memory store** (:mod:`.memory`) — shards in memory, for tests and the
  simulator.
* **remote store** (:mod:`.remote`) — a storage node over the wire.
* **durable write** (:mod:`.durable`) — on disk once the call returns: temp
  file, fsync, rename, fsync of the directory; private files (0600).

May import: core, net, wire.
"""
