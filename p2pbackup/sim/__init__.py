"""Simulation: the real node on a simulated network, and durability by the numbers.

Nouns:

* **durability model** — an event-level Monte Carlo of placement, failures,
  audits and repair over many nodes and years, using the node's own
  placement and repair-policy code (:mod:`p2pbackup.sim.durability`); the
  closed forms it is checked against (:mod:`p2pbackup.sim.closedform`);
  sweeps of it over a grid of parameters on Dask
  (:mod:`p2pbackup.sim.sweep`). docs/simulation.md tells how to run them.
* **simulator** — unmodified nodes run in one process on the memory network
  in virtual time, driven by a scenario (to come with the simulation issue).

It sits above the app layer because the simulator runs the daemon itself.

May import: core, net, wire, stores, dht, engine, maintenance, node, app.
"""
