"""The owner's composition roots: the command line, the daemon, and the home they act on.

Nouns:

* **home** (:mod:`.home`) — the directory where one node keeps its secret, its
  index, its hosted shards and its lock; :mod:`.homedht` reads what discovery
  needs from it.
* **operations** (:mod:`.operations`) — what a user does to a home: init,
  recover, add a peer or a friend, open its repository.
* **daemon** (:mod:`.daemon`) — ``serve``: the storage server, the DHT, the
  control socket and scheduled backups, wired to one home.
* **cli** (:mod:`.cli`) — the ``p2pbackup`` command.
* **devnet** and **demo** (:mod:`.devnet`, :mod:`.demo`) — a local network of
  real ``serve`` processes on loopback, and the whole story told on one.

May import: core, net, wire, stores, dht, engine, node.
"""
