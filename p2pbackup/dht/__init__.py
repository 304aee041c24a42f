"""Finding peers: the Kademlia DHT, signed records, invites and discovery.

Nouns:

* **adapter** (:mod:`.adapter`) — the ``kademlia`` package run inside trio
  (through trio-asyncio) and nowhere else; its datagrams pass through the
  :mod:`~p2pbackup.net` layer, so the simulator's network carries them too.
* **record** (:mod:`.records`) — a signed DHT value (a contact record, a root
  pointer); the newest valid one wins, never the majority.
* **rate limit** (:mod:`.ratelimit`) — how much work one source may ask.
* **invite code** (:mod:`.invites`) — how a friend reaches a node and knows it.
* **discovery** (:mod:`.discovery`) — what a running node does in the DHT, and
  one-shot lookups.

The DHT sits above the stores because it keeps its state with their durable
writes; it knows nothing of a home's index (the app layer reads that).

May import: core, net, wire, stores.
"""
