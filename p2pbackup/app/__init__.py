"""The owner's composition roots: the service, the daemon, and the home they act on.

Nouns:

* **home** (:mod:`.home`) — the directory where one node keeps its secret, its
  index, its hosted shards and its lock; :mod:`.homedht` reads what discovery
  needs from it; :mod:`.homenat` keeps a home node's port mapped and its
  reachability known.
* **operations** (:mod:`.operations`) — what a user does to a home: init,
  recover, add a peer or a friend, open its repository.
* **request** (:mod:`.requests`) — one command on a home's repository and its
  typed arguments, as the command line builds it and the control socket
  carries it.
* **service** (:mod:`.service`) — runs each request, one method a command,
  writing to the console it is given: in the command's own process, or in
  the daemon for a client of the control socket.
* **daemon** (:mod:`.daemon`) — ``serve``: the storage server, the DHT, the
  control socket and scheduled backups, wired to one home.
* **devnet** and **demo** (:mod:`.devnet`, :mod:`.demo`) — a local network of
  real ``serve`` processes on loopback, and the whole story told on one.

May import: core, net, wire, stores, dht, engine, maintenance, node.
"""
