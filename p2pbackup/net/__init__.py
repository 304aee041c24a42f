"""The network as node code sees it, real or simulated.

Nouns:

* **address** — a host and port (:class:`~.network.Address`).
* **network** — what a node dials, listens on and sends datagrams through
  (:class:`~.network.Network`): :class:`~.network.TcpNetwork` on real sockets,
  or the **memory network** (:mod:`.memory`): hosts, links with latency,
  bandwidth and loss, partitions, home routers (NAT), in trio's (virtual) time.
* **port mapping** — asking the home router to forward a port
  (:mod:`.portmap`), by NAT-PMP or PCP (:mod:`.natpmp`, the messages).

Nothing above this layer opens a socket itself, which is what lets the same
node run on loopback, across hosts, or inside the simulator.

May import: core.
"""
