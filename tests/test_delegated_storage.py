"""Storage nodes and delegates: what a delegation certificate lets its holder
do in its owner's namespace (audit, renew, put, list, read), what it never
lets it do (delete, root records), and which certificates are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from p2pbackup.core import delegation
from p2pbackup.errors import ShardNotFoundError, StoreError, StoreFullError
from p2pbackup.model import RepairGrant
from p2pbackup.net.network import Network, TcpNetwork
from p2pbackup.node import shardhost
from p2pbackup.node.server import ServerLimits
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.wire import messages
from p2pbackup.wire.messages import RefusalCode

from .net_helpers import RunningNode, identity, start_node
from .storage_conformance import shard_id

OWNER = identity("owner")
DELEGATE = identity("delegate")
STRANGER = identity("stranger")
NOW = 1_800_000_000


class Clock:
    """The storage node's clock, which a test moves."""

    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def network() -> Network:
    return TcpNetwork()


@pytest.fixture
async def node(
    tmp_path: Path, nursery: trio.Nursery, network: Network, clock: Clock
) -> RunningNode:
    return await start_node(
        nursery, network, tmp_path / "node", limits=ServerLimits(idle=5, transfer=2), clock=clock
    )


def certificate(
    delegate: bytes = DELEGATE.node_id, *, now: int = NOW, lifetime: int = 86400
) -> bytes:
    return delegation.issue_certificate(OWNER.signing_seed, delegate, now=now, lifetime=lifetime)


async def test_a_delegate_audits_renews_puts_and_reads_in_the_owners_namespace(
    node: RunningNode, network: Network
) -> None:
    owner = node.client(network, OWNER)
    await owner.put(shard_id(1), b"owner's ciphertext" * 100)
    delegate = node.client(network, DELEGATE, certificate=certificate())

    assert await delegate.get(shard_id(1)) == b"owner's ciphertext" * 100
    assert await delegate.has(shard_id(1))
    proof = await delegate.audit(shard_id(1), os.urandom(16), [0], 4096)
    assert proof.blocks
    expiry, missing = await delegate.renew([shard_id(1), shard_id(9)], 7200)
    assert missing == [shard_id(9)] and expiry >= NOW + 7200
    await delegate.put(shard_id(2), b"rebuilt shard")
    assert (await delegate.space()).used > 0
    assert sorted(await delegate.list()) == sorted([shard_id(1), shard_id(2)])

    # The rebuilt shard is the owner's, not the delegate's.
    assert sorted(await owner.list()) == sorted([shard_id(1), shard_id(2)])
    assert await owner.get(shard_id(2)) == b"rebuilt shard"
    assert await node.client(network, DELEGATE).list() == []
    await owner.aclose()
    await delegate.aclose()


async def test_a_delegate_cannot_delete_or_touch_root_records(
    node: RunningNode, network: Network
) -> None:
    owner = node.client(network, OWNER)
    await owner.put(shard_id(1), b"keep me")
    await owner.put_root(b"the owner's root")
    delegate = node.client(network, DELEGATE, certificate=certificate())

    for attempt in (
        delegate.delete(shard_id(1)),
        delegate.get_root(),
        delegate.put_root(b"forged root"),
        delegate.delete_all(),
        delegate.put_grant(b"g", b"c"),
    ):
        with pytest.raises(StoreError, match="may audit, renew, put, list and read"):
            await attempt
    assert await owner.get(shard_id(1)) == b"keep me"
    assert await owner.get_root() == b"the owner's root"
    await owner.aclose()
    await delegate.aclose()


@pytest.mark.parametrize(
    ("sealed", "reason"),
    [
        (lambda: certificate(now=NOW - 2 * 86400), "expired"),
        (lambda: certificate(now=NOW + 3600), "after now"),
        (lambda: certificate(STRANGER.node_id), "as its delegate"),
        (
            lambda: (
                delegation.issue_certificate(
                    STRANGER.signing_seed, DELEGATE.node_id, now=NOW, lifetime=86400
                )[:-1]
                + b"\0"
            ),
            "signature",
        ),
        (lambda: b"not a certificate", "signed envelope"),
    ],
    ids=["expired", "not-yet-valid", "another-delegate", "forged", "garbage"],
)
async def test_bad_certificates_are_refused_with_their_reason(
    node: RunningNode, network: Network, sealed: object, reason: str
) -> None:
    owner = node.client(network, OWNER)
    await owner.put(shard_id(1), b"data")
    data = sealed()  # type: ignore[operator]
    delegate = node.client(network, DELEGATE, certificate=data)
    with pytest.raises(StoreError, match=reason):
        await delegate.get(shard_id(1))
    await owner.aclose()
    await delegate.aclose()


async def test_another_owners_certificate_reaches_only_that_owner(
    node: RunningNode, network: Network
) -> None:
    """A stranger's certificate for the delegate opens the stranger's
    namespace, never the owner's."""
    owner = node.client(network, OWNER)
    await owner.put(shard_id(1), b"owner's")
    theirs = delegation.issue_certificate(
        STRANGER.signing_seed, DELEGATE.node_id, now=NOW, lifetime=86400
    )
    delegate = node.client(network, DELEGATE, certificate=theirs)
    with pytest.raises(ShardNotFoundError):
        await delegate.get(shard_id(1))
    await owner.aclose()
    await delegate.aclose()


async def test_a_certificate_is_checked_again_on_every_request(
    node: RunningNode, network: Network, clock: Clock
) -> None:
    owner = node.client(network, OWNER)
    await owner.put(shard_id(1), b"data")
    delegate = node.client(network, DELEGATE, certificate=certificate(lifetime=600))
    assert await delegate.has(shard_id(1))
    clock.now += 600
    with pytest.raises(StoreError, match="expired"):
        await delegate.has(shard_id(1))
    await owner.aclose()
    await delegate.aclose()


async def test_a_revoked_delegate_is_refused_and_a_new_certificate_is_honoured(
    node: RunningNode, network: Network
) -> None:
    owner = node.client(network, OWNER)
    await owner.put(shard_id(1), b"data")
    delegate = node.client(network, DELEGATE, certificate=certificate())
    assert await delegate.has(shard_id(1))
    await owner.revoke_delegate(DELEGATE.node_id, NOW + 1)
    # On the session already open, and on a new one.
    with pytest.raises(StoreError, match="revoked its delegation"):
        await delegate.has(shard_id(1))
    await delegate.aclose()
    with pytest.raises(StoreError, match="revoked its delegation"):
        await delegate.has(shard_id(1))
    # Another delegate is not affected; a certificate issued later is good.
    renewed = node.client(network, DELEGATE, certificate=certificate(now=NOW + 1))
    assert await renewed.has(shard_id(1))
    await owner.aclose()
    await renewed.aclose()


async def test_a_delegate_keeps_the_newest_grant_and_drops_it_when_revoked(
    node: RunningNode, network: Network
) -> None:
    """The node here plays the delegate: the owner hands it grants."""
    owner = node.client(network, OWNER)
    me = node.identity.node_id
    cert = delegation.issue_certificate(OWNER.signing_seed, me, now=NOW, lifetime=86400)

    def grant(sequence: int) -> bytes:
        return delegation.seal_grant(
            OWNER.signing_seed, RepairGrant(OWNER.node_id, sequence, NOW, (), ())
        )

    assert await owner.put_grant(grant(5), cert) == 5
    held = node.host.held_grant(OWNER.node_id)
    assert held is not None and held.sequence == 5 and held.certificate == cert
    with pytest.raises(StoreError, match="newer than 4"):
        await owner.put_grant(grant(4), cert)
    assert await owner.put_grant(grant(6), cert) == 6
    # A grant with another node's certificate, or signed by another, is refused.
    other = delegation.issue_certificate(OWNER.signing_seed, STRANGER.node_id, now=NOW)
    with pytest.raises(StoreError, match="as its delegate"):
        await owner.put_grant(grant(7), other)
    stranger = node.client(network, STRANGER)
    with pytest.raises(StoreError, match="not of node"):
        await stranger.put_grant(grant(7), cert)
    await owner.revoke_delegate(me, NOW + 1)
    assert node.host.held_grant(OWNER.node_id) is None
    await owner.aclose()
    await stranger.aclose()


async def test_a_delegated_session_refuses_a_second_delegation(
    node: RunningNode, network: Network
) -> None:
    delegate = node.client(network, DELEGATE, certificate=certificate())
    channel = await delegate.open_channel()
    await channel.send(messages.Delegate(certificate()))
    answer = await channel.receive()
    assert isinstance(answer, messages.Refused)
    assert answer.code == RefusalCode.FORBIDDEN
    await trio.aclose_forcefully(channel.stream)
    await delegate.aclose()


async def test_a_node_without_repair_logs_says_so(node: RunningNode, network: Network) -> None:
    owner = node.client(network, OWNER)
    with pytest.raises(StoreError, match="keeps no repair logs"):
        await owner.get_repair_log()
    node.server.repair_log = lambda asker: b"log of " + asker
    assert await owner.get_repair_log() == b"log of " + OWNER.node_id
    await owner.aclose()


def test_the_host_keeps_grants_and_revocations_until_the_owner_goes(tmp_path: Path) -> None:
    owner, other = b"\x01" * 20, b"\x02" * 20
    host = ShardHost.open(tmp_path / "host")
    assert host.put_grant(owner, 5, b"grant 5", b"cert") == 5
    assert host.put_grant(owner, 4, b"grant 4", b"cert") == 5  # an older one is not taken
    host.revoke_delegate(owner, other, 100)
    host.revoke_delegate(owner, other, 50)  # the latest time asked for is kept
    host.close()
    host = ShardHost.open(tmp_path / "host")  # and all of it survives a restart
    held = host.held_grant(owner)
    assert held is not None and (held.sequence, held.grant) == (5, b"grant 5")
    assert host.revoked_before(owner, other) == 100
    for i in range(shardhost.MAX_REVOCATIONS_PER_OWNER - 1):
        host.revoke_delegate(owner, i.to_bytes(20, "big"), 1)
    with pytest.raises(StoreFullError, match="at most"):
        host.revoke_delegate(owner, b"\xff" * 20, 1)
    host.revoke_delegate(owner, other, 200)  # one it keeps may still move on
    assert host.delete_owner(owner) == (0, False)
    assert host.held_grant(owner) is None and host.revoked_before(owner, other) == 0
    host.close()
