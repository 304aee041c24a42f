"""The local web dashboard and the alerts: a window on a running node.

Nouns:

* **dashboard** — web pages and a JSON API that ``serve`` offers on
  127.0.0.1 (:mod:`.role`, :mod:`.asgi`, :mod:`.http`, :mod:`.pages`): the
  verdict on our data, peers and friends, snapshots to browse and restore,
  activity over time (:mod:`.plots`), the settings. Its data and its actions
  come from the node through the service's requests (:mod:`.source`).
* **token** — the secret that opens it (:mod:`.access`).
* **alert** — a message sent when something the user should know changes
  state (:mod:`.alerts`, pure), by webhook or email (:mod:`.notify`).
* **history** — samples over time and the alerts' states, in the
  dashboard's own file (:mod:`.history`).
* **settings** — ``config.toml`` as a whole, with its ``[alerts]`` and
  ``[ui]`` tables (:mod:`.settings`).

It sits above the app and sim layers (it runs the app's service) and below
the command line, which starts it with ``serve``.

May import: core, net, wire, stores, dht, engine, maintenance, node, app, sim.
"""
