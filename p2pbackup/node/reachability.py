"""Reachability: whether friends can dial this node directly, and if not, why.

A node behind a home router cannot tell from inside whether the world reaches
it: the router may have mapped its port, a user may have forwarded one by
hand, or nothing lets a stranger in. So it asks a friend to try (as AutoNAT
does for libp2p).

Nouns:

* **dial-back** — a :class:`~p2pbackup.wire.messages.DialBack` request: "dial
  me at these addresses". The friend connects to each and completes a
  handshake expecting the asker's own node; it answers, per address, whether
  that worked (:class:`~p2pbackup.wire.messages.DialBackResult`).
* **dial-back service** — :class:`DialBackService`, the friend's side. It
  answers only friends, and dials only an address that is in the asker's
  contact record or whose host is the address the asker's connection came
  from (any other counts as not reached, and a request naming none of those
  is refused) — never an address a stranger names, so nobody can use a node
  to probe a third party.
* **verdict** — :class:`Reachability`: reachable directly at some addresses,
  not reachable (with why: what the router said, which addresses no friend
  could dial), or unknown (no friend answered). :meth:`Reachability.describe`
  is the line ``status`` and the log show.
* **check** — :func:`check_reachability`: ask friends in turn until one
  answers, then judge.
* **board** — :class:`ReachabilityBoard`: the latest verdict of the running
  node, found through :data:`REACHABILITY` by the commands it runs (``status``,
  which need not load the DHT to read it); a role may wait for the next one
  (:meth:`ReachabilityBoard.changed`), as the relays do
  (:func:`p2pbackup.app.relays.relay_while_unreachable`).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from p2pbackup.errors import (
    IntegrityError,
    P2PBackupError,
    PeerUnavailableError,
    ProtocolError,
    UsageError,
)
from p2pbackup.net.network import Address, Network
from p2pbackup.wire import messages
from p2pbackup.wire.rpc import MessageChannel
from p2pbackup.wire.session import Identity, secure_initiator

log = logging.getLogger(__name__)

#: Seconds a dial-back waits for each address to answer (connect and handshake).
DIAL_TIMEOUT = 10.0
#: Seconds an asker waits for a friend's answer: the friend dials first.
ASK_TIMEOUT = DIAL_TIMEOUT + 20.0

#: The addresses a node published for itself, by node id (its contact record).
ContactAddresses = Callable[[bytes], Awaitable[Sequence[Address]]]
#: What the storage server calls for a friend's DialBack: (asker, the host its
#: connection came from, the addresses named) → reachable per address, or
#: UsageError when it may not dial them.
DialBacker = Callable[[bytes, str | None, Sequence[str]], Awaitable[tuple[bool, ...]]]


@attrs.frozen
class Reachability:
    """What a node knows of how the world reaches it."""

    #: Addresses a friend dialled successfully.
    reachable_at: tuple[Address, ...] = ()
    #: Addresses a friend tried and could not reach.
    unreachable_at: tuple[Address, ...] = ()
    #: Why the router did not map the port (None: it did, or was not asked).
    mapping_failure: str | None = None
    #: Whether any friend answered the dial-back (False: unknown).
    checked: bool = False

    def describe(self) -> str:
        if self.reachable_at:
            return "reachable directly at " + ", ".join(map(str, self.reachable_at))
        router = (
            f"port mapping failed: {self.mapping_failure}; "
            if self.mapping_failure is not None
            else ""
        )
        if not self.checked:
            return (
                f"reachability unknown: {router}no friend answered to dial this node back "
                "(it tries again at each port-mapping renewal)"
            )
        tried = ", ".join(map(str, self.unreachable_at)) or "no address"
        return (
            f"not reachable: {router}no friend could dial {tried}; relays will be used "
            "(forwarding the port on the router would let friends connect directly)"
        )


async def dial(network: Network, identity: Identity, node_id: bytes, address: Address) -> bool:
    """Whether ``node_id`` answers at ``address`` (a handshake completes as it)."""
    try:
        with trio.fail_after(DIAL_TIMEOUT):
            stream = await network.connect(address)
            try:
                secure = await secure_initiator(stream, identity, expected_node_id=node_id)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            await trio.aclose_forcefully(secure)
            return True
    except (trio.TooSlowError, PeerUnavailableError, ProtocolError, IntegrityError):
        return False
    except trio.BrokenResourceError:
        return False


class DialBackService:
    """A friend's side of the dial-back (see the module docstring)."""

    def __init__(
        self, network: Network, identity: Identity, contact_addresses: ContactAddresses
    ) -> None:
        self.network = network
        self.identity = identity
        self.contact_addresses = contact_addresses

    async def allowed(
        self, asker: bytes, observed_host: str | None, addresses: Sequence[Address]
    ) -> list[Address]:
        """The addresses of ``addresses`` this node may dial for ``asker``."""
        published = set(await self.contact_addresses(asker))
        return [a for a in addresses if a in published or a.host == observed_host]

    async def __call__(
        self, asker: bytes, observed_host: str | None, texts: Sequence[str]
    ) -> tuple[bool, ...]:
        """Dial ``asker`` at each address it may be dialled at (in parallel);
        the others count as not reached. UsageError when it may be dialled at
        none of them (or one is not an address)."""
        try:
            addresses = [Address.parse(text, allow_port_zero=False) for text in texts]
        except UsageError as error:
            raise UsageError(f"cannot dial back: {error}") from None
        allowed = await self.allowed(asker, observed_host, addresses)
        if not allowed:
            raise UsageError(
                f"will not dial {', '.join(texts)}: not in node {asker.hex()[:16]}'s contact "
                "record, nor where its connection came from"
            )
        results = [False] * len(addresses)

        async def one(index: int) -> None:
            results[index] = await dial(self.network, self.identity, asker, addresses[index])

        async with trio.open_nursery() as nursery:
            for index, address in enumerate(addresses):
                if address in allowed:
                    nursery.start_soon(one, index)
        return tuple(results)


async def ask_dial_back(
    network: Network,
    identity: Identity,
    friend_id: bytes,
    friend_address: Address,
    addresses: Sequence[Address],
) -> tuple[bool, ...]:
    """Ask the friend at ``friend_address`` to dial this node at ``addresses``."""
    name = f"node {friend_id.hex()[:16]} at {friend_address}"
    try:
        with trio.fail_after(ASK_TIMEOUT):
            stream = await network.connect(friend_address)
            try:
                secure = await secure_initiator(stream, identity, expected_node_id=friend_id)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            channel = MessageChannel(secure)
            try:
                request = messages.DialBack(tuple(str(a) for a in addresses))
                await channel.send(request)
                answer = await channel.receive()
            finally:
                await channel.aclose()
    except trio.TooSlowError:
        raise PeerUnavailableError(f"{name}: no answer within {ASK_TIMEOUT:g} s") from None
    except (ProtocolError, IntegrityError, trio.BrokenResourceError) as exc:
        raise PeerUnavailableError(f"{name}: {exc}") from None
    if isinstance(answer, messages.Refused):
        raise PeerUnavailableError(f"{name} refused to dial back: {answer.message}")
    if not isinstance(answer, messages.DialBackResult) or len(answer.reachable) != len(addresses):
        raise PeerUnavailableError(f"{name} answered the dial-back with {type(answer).__name__}")
    return answer.reachable


async def check_reachability(
    network: Network,
    identity: Identity,
    addresses: Sequence[Address],
    friends: Sequence[tuple[bytes, Sequence[Address]]],
    *,
    mapping_failure: str | None = None,
) -> Reachability:
    """Ask friends (node id, addresses) in turn until one dials ``addresses``."""
    addresses = list(addresses)[: messages.MAX_DIAL_BACK_ADDRESSES]
    for friend_id, friend_addresses in friends:
        for friend_address in friend_addresses:
            try:
                results = await ask_dial_back(
                    network, identity, friend_id, friend_address, addresses
                )
            except P2PBackupError as error:
                log.info("reachability: %s", error)
                continue
            return Reachability(
                tuple(a for a, ok in zip(addresses, results, strict=True) if ok),
                tuple(a for a, ok in zip(addresses, results, strict=True) if not ok),
                mapping_failure,
                checked=True,
            )
    return Reachability(mapping_failure=mapping_failure)


@attrs.define
class ReachabilityBoard:
    """What the running node last learnt of its reachability."""

    verdict: Reachability | None = None
    #: The public address the router forwards, while it does.
    mapped: Address | None = None
    _told: trio.Event = attrs.field(factory=trio.Event, init=False, repr=False)

    def tell(self, verdict: Reachability) -> None:
        """A new verdict: kept, and whoever waits for one wakes."""
        self.verdict = verdict
        self._told.set()
        self._told = trio.Event()

    async def changed(self) -> None:
        """Wait for the next verdict."""
        await self._told.wait()

    def unreachable(self) -> bool:
        """Whether friends tried and none could dial this node."""
        verdict = self.verdict
        return verdict is not None and verdict.checked and not verdict.reachable_at

    def line(self) -> str:
        if self.verdict is None:
            return "reachability: not checked yet"
        return self.verdict.describe()


#: The board of the node running in this process, for ``status``.
REACHABILITY: contextvars.ContextVar[ReachabilityBoard | None] = contextvars.ContextVar(
    "REACHABILITY", default=None
)
