"""Keeping backups alive after they are made: audits, reputation, repair, leases.

Nouns:

* **audit** — a challenge to a peer about one shard it holds for us: a nonce
  and block indices derived from it; the peer answers with those blocks and
  their Merkle proofs, and the owner checks them against the root it kept,
  never downloading the shard.
* **reputation** — what audits and contacts say of a peer over time
  (decaying), kept in the index; it decides whether a peer still gets shards
  and whether its shards still count.
* **standing** — where a peer and each of its shards stand by the audits so
  far: what ``status`` shows and repair decides with.
* **repair** — rebuilding the missing shards of a pack whose healthy shards
  fell below the repair threshold, from any k healthy ones, onto peers that
  hold none of that pack.
* **status** (:mod:`.status`) — this node, each peer now, what audits and
  repair found and did for it, and the health of our data: what
  ``p2pbackup status`` shows.
* **lease** — how long a holder keeps a shard without hearing from its owner;
  the owner renews the leases of its live shards.

Pure policy (challenges, verification, repair plans) takes values and returns
decisions; thin trio layers ask the peers.

May import: core, net, wire, stores, dht, engine.
"""
