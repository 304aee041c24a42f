"""The storage protocol on the wire: sans-IO codecs and state machines, and a thin trio layer.

Nouns:

* **message** (:mod:`.messages`) — one frame of the storage protocol; one table
  drives both its encoder and its decoder. Pure.
* **handshake** (:mod:`.noise`) — ``Noise_XX_25519_ChaChaPoly_BLAKE2b`` as a
  sans-IO state machine. Pure.
* **session** (:mod:`.session`) — a Noise transport over a trio stream, bound to
  a node identity (a peer *is* its key).
* **rpc** (:mod:`.rpc`) — requests and answers over a session.

May import: core, net.
"""
