"""The command line: the top of the stack.

Nouns:

* **command line** (:mod:`.main`) — the ``p2pbackup`` program: parses what
  was typed into a request (or runs the few commands that are its own) and
  hands it to a running daemon of the home, or to the service here; the
  simulator's commands go to :mod:`p2pbackup.sim`.

``python -m p2pbackup.cli`` runs it (:mod:`.__main__`).

May import: core, net, wire, stores, dht, engine, maintenance, node, app, sim, ui.
"""
