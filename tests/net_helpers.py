"""Storage nodes for tests: a real StorageServer on a real or in-memory network."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from p2pbackup.core.keys import Keyring
from p2pbackup.net.network import Address, Network
from p2pbackup.node.server import ServerLimits, StorageServer
from p2pbackup.node.shardhost import ShardCharge, ShardHost
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.wire.session import Identity

LOOPBACK_ANY_PORT = Address("127.0.0.1", 0)
DEFAULT_LIMITS = ServerLimits()
#: A node that charges owners exactly the bytes they store, for tests that
#: count bytes through the protocol (the default charges whole disk blocks).
BYTES_ONLY = ShardCharge(block=1, per_file=0)
DEFAULT_CHARGE = ShardCharge()


def identity(name: str) -> Identity:
    """A deterministic identity per name."""
    secret = hashlib.blake2b(name.encode(), digest_size=32).digest()
    return Identity.from_keyring(Keyring.from_master_secret(secret))


@attrs.frozen
class RunningNode:
    identity: Identity
    address: Address
    host: ShardHost
    server: StorageServer

    def client(self, network: Network, owner: Identity, **kwargs: object) -> RemoteShardStore:
        return RemoteShardStore(
            network,
            owner,
            self.address,
            self.identity.node_id,
            **kwargs,  # type: ignore[arg-type]
        )


async def start_node(
    nursery: trio.Nursery,
    network: Network,
    root: Path,
    *,
    name: str = "node",
    listen: Address = LOOPBACK_ANY_PORT,
    limits: ServerLimits = DEFAULT_LIMITS,
    capacity: int | None = None,
    owner_quota: int | None = None,
    charge: ShardCharge = DEFAULT_CHARGE,
    clock: Callable[[], float] = time.time,
) -> RunningNode:
    """A storage node serving from ``root`` until ``nursery`` is cancelled."""
    host = ShardHost.open(
        root, capacity=capacity, owner_quota=owner_quota, charge=charge, clock=clock
    )
    node_identity = identity(name)
    server = StorageServer(host, node_identity, limits=limits)
    address = await nursery.start(network.serve, listen, server.handle_connection)
    return RunningNode(node_identity, address, host, server)
