"""The network as node code sees it, real or simulated.

Nouns:

* **address** — a host and port (:class:`~.network.Address`).
* **network** — what a node dials, listens on and sends datagrams through
  (:class:`~.network.Network`): :class:`~.network.TcpNetwork` on real sockets,
  or the **memory network** (:mod:`.memory`): hosts, links with latency,
  bandwidth and loss, partitions, in trio's (virtual) time.

Nothing above this layer opens a socket itself, which is what lets the same
node run on loopback, across hosts, or inside the simulator.

May import: core.
"""
