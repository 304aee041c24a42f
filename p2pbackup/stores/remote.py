"""A peer on the network as a shard store: the storage protocol's client side.

Nouns:

* **remote store** — :class:`RemoteShardStore`: one owner's namespace on one
  storage node, reached at an address and known by its node id. It implements
  :class:`~p2pbackup.stores.shardstore.ShardStore`, so the engine cannot tell it
  from a folder.
* **connection** — an authenticated, encrypted session with the node
  (:mod:`p2pbackup.wire.session`) carrying one request at a time. The store keeps a
  few open and idle between requests (the **pool**), and opens them lazily.
  A connection on which anything went wrong mid-request is closed, never
  reused: its state is unknown.
* **lease** — how long the node keeps a shard unless it is renewed; the owner
  signs every put, renewal and deletion, binding them to this node's id.
* **locator** — where to ask for the node's current routes when it stops
  answering at the address on record (the DHT, for a friend whose IP
  changed): its own addresses, then the relays it names
  (:class:`~p2pbackup.wire.relay.Route`). The node must still prove its id
  in the handshake wherever it is found, so a locator can point to the wrong
  place but never to the wrong node.
* **delegated store** — a remote store made with a delegation
  ``certificate``: every connection opens with ``Delegate``, so that its
  requests reach the certificate's owner's namespace, signed by this node
  as the owner's delegate (docs/delegation.md). The node answers only
  audits, renewals, puts, reads and usage on such a connection.
* **route** — where the store dials now: the address on record, or what the
  locator found. A route through a relay serves the store for its life but
  is not written back as the node's address (the next store tries the
  node's own address first again, in case its router now lets it in).

Failures are :class:`~p2pbackup.errors.StoreError`\\ s, so the engine routes
around them like a missing folder: a node that cannot be reached, does not
answer in time or breaks the protocol is :class:`PeerUnavailableError`; its
refusals map to :class:`ShardNotFoundError`, :class:`StoreFullError` or
:class:`StoreError` with the node's reason.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias, TypeVar

import trio

from p2pbackup.core import crypto, merkle
from p2pbackup.errors import (
    IntegrityError,
    P2PBackupError,
    PeerUnavailableError,
    ProtocolError,
    RemoteProtocolError,
    ShardNotFoundError,
    StoreError,
    StoreFullError,
)
from p2pbackup.model import BytesLike
from p2pbackup.net.network import Address, Network
from p2pbackup.stores.shardstore import (
    STALE_TEMP_SECONDS,
    ShardRoot,
    Space,
    check_audit_size,
    check_range,
    check_shard_id,
)
from p2pbackup.wire import messages
from p2pbackup.wire.messages import RefusalCode
from p2pbackup.wire.relay import Route, open_session
from p2pbackup.wire.rpc import MessageChannel
from p2pbackup.wire.session import Identity

#: Leases asked for new shards and renewals: a year, renewed monthly
#: (:mod:`p2pbackup.maintenance.leases`), so that a user who lost the machine
#: has at least eleven months to recover before the shards may be collected.
DEFAULT_LEASE_SECONDS = 365 * 24 * 3600
#: Merkle block size of the roots this store computes itself (when the caller
#: passes none).
TRANSFER_BLOCK_SIZE = merkle.DEFAULT_BLOCK_SIZE
_T = TypeVar("_T")
_M = TypeVar("_M")

log = logging.getLogger(__name__)

#: Where a node is now: node id → its current routes, direct ones first
#: (none if unknown).
Locator: TypeAlias = Callable[[bytes], Awaitable[Sequence[Route]]]

#: Shard ids asked for in one listing page.
_LIST_PAGE = 5000


class RemoteShardStore:
    """One owner's shards on the storage node ``node_id`` at ``address``."""

    def __init__(
        self,
        network: Network,
        identity: Identity,
        address: Address,
        node_id: bytes,
        *,
        connections: int = 2,
        connect_timeout: float = 10.0,
        io_timeout: float = 60.0,
        lease_seconds: int = DEFAULT_LEASE_SECONDS,
        locate: Locator | None = None,
        moved: Callable[[Address], None] | None = None,
        certificate: bytes | None = None,
    ) -> None:
        self.network = network
        #: A sealed delegation certificate every connection presents first
        #: (None: the store is ours).
        self.certificate = certificate
        self.identity = identity
        self.address = address
        self.route = Route(address)
        self.node_id = node_id
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.lease_seconds = lease_seconds
        self._slots = trio.Semaphore(connections)
        self._idle: list[MessageChannel] = []
        self.locate = locate
        #: Told the new address when the node is found elsewhere.
        self.moved = moved
        self._located = False
        self._locating = trio.Lock()

    @property
    def name(self) -> str:
        return f"node {self.node_id.hex()[:16]} at {self.route}"

    # -- connections ------------------------------------------------------------

    async def open_channel(self) -> MessageChannel:
        """A new authenticated connection (a hook: benchmarks replace it with plain TCP).

        If the node does not answer at its address, the locator (once per
        store) is asked where it is now, and the node is tried there.
        """
        tried = self.route
        try:
            return await self._connect(tried)
        except PeerUnavailableError as failure:
            if self.locate is None:
                raise
            async with self._locating:
                if self.route != tried:  # another connection found it meanwhile
                    return await self._connect(self.route)
                if self._located:
                    raise
                # Once per store; a look-up cut short (a caller's timeout
                # cancelled it) has not used its turn.
                try:
                    channel = await self._relocate(failure)
                except PeerUnavailableError:
                    self._located = True
                    raise
                self._located = True
                return channel

    async def _relocate(self, failure: PeerUnavailableError) -> MessageChannel:
        assert self.locate is not None
        try:
            candidates = list(await self.locate(self.node_id))
        except P2PBackupError as error:
            raise PeerUnavailableError(f"{failure}; looking it up failed: {error}") from None
        for route in candidates:
            if route == self.route:
                continue
            try:
                channel = await self._connect(route)
            except PeerUnavailableError as error:
                log.info("%s", error)
                continue
            log.info("node %s moved from %s to %s", self.node_id.hex(), self.route, route)
            self.route = route
            if route.relay is None:
                self.address = route.address
                if self.moved is not None:
                    self.moved(route.address)
            return channel
        where = ", ".join(str(r) for r in candidates) or "nowhere else"
        raise PeerUnavailableError(f"{failure}; its published addresses: {where}") from None

    async def _connect(self, route: Route) -> MessageChannel:
        secure = await open_session(
            self.network, self.identity, route, self.node_id, timeout=self.connect_timeout
        )
        channel = MessageChannel(secure)
        if self.certificate is not None:
            await self._delegate(channel)
        return channel

    async def _delegate(self, channel: MessageChannel) -> None:
        """Present the certificate on a new connection; a refusal is a StoreError."""
        assert self.certificate is not None
        request = messages.Delegate(self.certificate)
        try:
            with trio.fail_after(self.io_timeout):
                await channel.send(request)
                self._answer(await channel.receive(), messages.Delegated, request)
        except BaseException as error:
            await trio.aclose_forcefully(channel.stream)
            if isinstance(error, trio.TooSlowError):
                raise PeerUnavailableError(f"{self.name}: no answer to the delegation") from None
            if isinstance(error, (ProtocolError, IntegrityError, trio.BrokenResourceError)):
                raise PeerUnavailableError(f"{self.name}: {error}") from None
            raise

    async def _exchange(self, operation: Callable[[MessageChannel], Awaitable[_T]]) -> _T:
        """Run one request's exchange on a connection from the pool (or a new one).

        A pooled connection may have been closed by the node while it sat idle
        (nodes close idle sessions); if it turns out dead, the exchange runs
        once more on a new connection. Every request is idempotent, so a
        repeat is safe even if the node did act on the first.
        """
        async with self._slots:
            if self._idle:
                try:
                    return await self._exchange_on(self._idle.pop(), operation)
                except _StaleConnection:
                    pass
            return await self._exchange_on(await self.open_channel(), operation, fresh=True)

    async def _exchange_on(
        self,
        channel: MessageChannel,
        operation: Callable[[MessageChannel], Awaitable[_T]],
        *,
        fresh: bool = False,
    ) -> _T:
        try:
            with trio.fail_after(self.io_timeout):
                result = await operation(channel)
        except trio.TooSlowError:
            await trio.aclose_forcefully(channel.stream)
            raise PeerUnavailableError(
                f"{self.name}: no answer within {self.io_timeout:g} s"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(channel.stream)
            if not fresh:
                raise _StaleConnection from None
            raise PeerUnavailableError(f"{self.name}: connection lost ({exc})") from None
        except (ProtocolError, IntegrityError) as exc:
            await trio.aclose_forcefully(channel.stream)
            raise PeerUnavailableError(f"{self.name}: {exc}") from None
        except StoreError:
            # A refusal ends its exchange cleanly: the connection stays good.
            self._idle.append(channel)
            raise
        except BaseException:
            await trio.aclose_forcefully(channel.stream)
            raise
        self._idle.append(channel)
        return result

    async def collect_garbage(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        return 0  # the node collects the temp files of its own dead writers

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for channel in idle:
            await trio.aclose_forcefully(channel.stream)

    async def _request(self, request: messages.Message, expected: type[_M]) -> _M:
        async def exchange(channel: MessageChannel) -> _M:
            await channel.send(request)
            return self._answer(await channel.receive(), expected, request)

        return await self._exchange(exchange)

    def _answer(
        self, answer: messages.Message, expected: type[_M], request: messages.Message
    ) -> _M:
        if isinstance(answer, expected):
            return answer
        if isinstance(answer, messages.Refused):
            raise self._refusal_error(answer, request)
        raise RemoteProtocolError(f"answered {type(request).__name__} with {type(answer).__name__}")

    def _refusal_error(self, refused: messages.Refused, request: messages.Message) -> StoreError:
        what = f"{self.name} refused {type(request).__name__}: {refused.message}"
        if refused.code == RefusalCode.NOT_FOUND:
            return ShardNotFoundError(what)
        if refused.code == RefusalCode.FULL:
            return StoreFullError(what)
        return StoreError(what)

    # -- the ShardStore interface -------------------------------------------------

    async def put(self, shard_id: bytes, data: BytesLike, root: ShardRoot | None = None) -> int:
        check_shard_id(shard_id)
        if root is None:
            digest = await trio.to_thread.run_sync(merkle.merkle_root, data, TRANSFER_BLOCK_SIZE)
            root = ShardRoot(TRANSFER_BLOCK_SIZE, digest)
        statement = messages.put_statement(
            self.node_id, shard_id, len(data), root.root, self.lease_seconds
        )
        request = messages.PutShard(
            shard_id,
            len(data),
            root.block_size,
            root.root,
            self.lease_seconds,
            crypto.sign(self.identity.signing_seed, statement),
        )

        async def exchange(channel: MessageChannel) -> int:
            await channel.send(request)
            answer = await channel.receive()
            if isinstance(answer, messages.Stored):
                return answer.lease_expiry  # already there
            self._answer(answer, messages.Ready, request)
            view = memoryview(data)
            for start in range(0, len(data), messages.PIECE_SIZE):
                await channel.send_piece(view[start : start + messages.PIECE_SIZE])
            return self._answer(await channel.receive(), messages.Stored, request).lease_expiry

        return await self._exchange(exchange)

    async def get(self, shard_id: bytes, offset: int = 0, length: int | None = None) -> bytes:
        check_shard_id(shard_id)
        check_range(offset, length)
        request = messages.GetShard(shard_id, offset, length)

        async def exchange(channel: MessageChannel) -> bytes:
            await channel.send(request)
            answer = self._answer(await channel.receive(), messages.ShardData, request)
            if length is not None and answer.size > length:
                raise RemoteProtocolError(f"sent {answer.size} bytes for a range of {length}")
            # Joined once at the end: growing a buffer piece by piece and
            # copying it into bytes moved every byte two more times.
            pieces: list[bytes] = []
            received = 0
            while received < answer.size:
                piece = await channel.receive()
                if not isinstance(piece, messages.ShardPiece):
                    raise RemoteProtocolError(f"sent {type(piece).__name__} inside a shard")
                pieces.append(piece.data)
                received += len(piece.data)
                if received > answer.size:
                    raise RemoteProtocolError(f"sent more than the {answer.size} bytes announced")
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)

        return await self._exchange(exchange)

    async def has(self, shard_id: bytes) -> bool:
        check_shard_id(shard_id)
        answer = await self._request(messages.HasShard(shard_id), messages.ShardStatus)
        return answer.present

    async def delete(self, shard_id: bytes) -> None:
        check_shard_id(shard_id)
        statement = messages.delete_statement(self.node_id, shard_id)
        signature = crypto.sign(self.identity.signing_seed, statement)
        await self._request(messages.DeleteShard(shard_id, signature), messages.Deleted)

    async def list(self) -> builtins.list[bytes]:
        found: builtins.list[bytes] = []
        after: bytes | None = None
        while True:
            answer = await self._request(messages.ListShards(after, _LIST_PAGE), messages.ShardList)
            ids = [entry.shard_id for entry in answer.entries]
            if any(a >= b for a, b in zip([after or b"", *ids], ids, strict=False)):
                raise PeerUnavailableError(f"{self.name}: shard listing out of order")
            found.extend(ids)
            if not answer.more:
                return found
            if not ids:
                raise PeerUnavailableError(f"{self.name}: empty listing page marked 'more'")
            after = ids[-1]

    async def put_root(self, data: bytes) -> None:
        await self._request(messages.PutRoot(data), messages.RootStored)

    async def get_root(self) -> bytes | None:
        answer = await self._request(messages.GetRoot(), messages.RootData)
        return answer.data

    async def usage(self) -> int:
        answer = await self._request(messages.GetUsage(), messages.Usage)
        return answer.used

    async def space(self) -> Space:
        answer = await self._request(messages.GetUsage(), messages.Usage)
        offered = answer.offered
        # A node's word, not checked: an offer below the usage means no room.
        return Space(answer.used, None if offered is None else max(offered, answer.used))

    async def audit(
        self, shard_id: bytes, nonce: bytes, indices: Sequence[int], block_size: int
    ) -> messages.AuditProof:
        """The node's answer to an audit, as it gave it: the caller verifies it
        against its own root. The node cuts the shard in the block size
        declared when it was put; ``block_size`` is not sent."""
        check_shard_id(shard_id)
        check_audit_size(indices)
        return await self._request(
            messages.Audit(shard_id, nonce, tuple(indices)), messages.AuditProof
        )

    # -- beyond the ShardStore interface -----------------------------------------

    async def renew(
        self, shard_ids: builtins.list[bytes], lease_seconds: int
    ) -> tuple[int, builtins.list[bytes]]:
        """Extend leases; the new expiry (unix seconds) and the ids the node lacks."""
        statement = messages.renew_statement(self.node_id, shard_ids, lease_seconds)
        signature = crypto.sign(self.identity.signing_seed, statement)
        answer = await self._request(
            messages.RenewLease(tuple(shard_ids), lease_seconds, signature), messages.LeaseRenewed
        )
        return answer.lease_expiry, builtins.list(answer.missing)

    async def delete_all(self) -> tuple[int, bool]:
        """Ask the node to delete every shard of ours and our root record: how
        many shards it deleted, and whether it held a root record."""
        statement = messages.delete_all_statement(self.node_id)
        signature = crypto.sign(self.identity.signing_seed, statement)
        answer = await self._request(messages.DeleteAll(signature), messages.AllDeleted)
        return answer.shards, answer.root

    async def revoke_delegate(self, delegate: bytes, before: int) -> None:
        """Tell the node to refuse our certificates for ``delegate`` issued
        before ``before`` (unix seconds)."""
        await self._request(messages.RevokeDelegate(delegate, before), messages.DelegateRevoked)

    async def put_grant(self, grant: bytes, certificate: bytes) -> int:
        """Hand the node, our delegate, a sealed grant and certificate; the
        grant sequence it holds now."""
        answer = await self._request(messages.PutGrant(grant, certificate), messages.GrantStored)
        return answer.sequence

    async def get_repair_log(self) -> bytes | None:
        """The sealed repair log the node, our delegate, keeps for us (None: none)."""
        answer = await self._request(messages.GetRepairLog(), messages.RepairLogData)
        return answer.data

    async def notify_leaving(self) -> bool:
        """Tell the node, an owner whose shards we store, that we are leaving
        the network; whether it counts us among its peers."""
        answer = await self._request(messages.Leaving(), messages.Noted)
        return answer.known


class _StaleConnection(Exception):
    """Internal: a pooled connection was found dead; the exchange may run again."""
