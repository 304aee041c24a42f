"""The parts a serving node is made of: storing for peers, and taking the CLI's commands.

Nouns:

* **shard host** (:mod:`.shardhost`) — what a storage node keeps on disk for its
  peers: shard files and their SQLite metadata, quotas, leases.
* **storage server** (:mod:`.server`) — answers the storage protocol from a host.
* **admission** (:mod:`.admission`) — which connections the server serves and
  for how long: every bound it keeps, friends first.
* **control socket** (:mod:`.control`) — how the CLI reaches a running node of
  the same home.
* **schedule** (:mod:`.schedule`) — ``config.toml``: scheduled backups and
  what the node offers its peers.
* **reachability** (:mod:`.reachability`) — whether friends can dial this
  node directly: the dial-back a friend does for it, and the verdict.

The daemon that wires these together with a home is a composition root and
lives in :mod:`p2pbackup.app.daemon`.

May import: core, net, wire, stores, dht, engine, maintenance.
"""
