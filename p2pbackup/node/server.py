"""The storage server: answers the storage protocol for peers, from a shard host.

Nouns:

* **server** — :class:`StorageServer`: one node's service to its peers. It
  accepts connections, runs the Noise handshake as responder, and then serves
  one **session** per connection.
* **session** — the requests of one authenticated peer, answered one at a
  time. The peer's node id (learnt in the handshake, never from a message) is
  the **owner** of every shard it stores, lists, renews or deletes, so no
  peer can touch another's shards: the host is asked only for the owner's own.
* **stranger's lease** — a node that is not a friend (open mode) is granted
  leases of at most :data:`STRANGER_LEASE_SECONDS`, so that what a stranger
  stored and abandoned is collected within that time; a friend may ask for
  up to the protocol's longest, and its shards are not collected anyway
  while it is a friend (:mod:`p2pbackup.node.shardhost`).
* **leaving notice** — a peer that stores shards *for us* telling us that
  it leaves the network (``Leaving``); the server hands its node id to
  ``leaving``, which records it so that our repair moves our shards away.
* **delegated session** — a session whose peer presented a delegation
  certificate (``Delegate``) naming it as delegate: from then on its
  requests are for the certificate's **owner** (its namespace, its quota,
  its leases), the peer's own key signs its puts and renewals, and only
  :data:`DELEGATE_REQUESTS` are answered, each after the certificate is
  checked again against the host's clock and the owner's revocations
  (docs/delegation.md). No deletes, no root records.
* **held grant** — a repair grant an owner hands this node as its delegate
  (``PutGrant``), kept by the shard host once its signature and the
  certificate beside it are checked.
* **refusal** — a :class:`~p2pbackup.wire.messages.Refused` answer: the request was
  understood and declined (not found, full, forbidden, conflict, integrity).
  The session goes on. A message that breaks the protocol instead ends the
  session (and only that session).

The host's work (disk, SQLite) runs in worker threads; everything here is the
thin trio layer. Every wait on a peer is bounded: the handshake, each message
of a transfer in either direction (and an upload's pace), and the idle time
between requests; and so are the connections served at once, per source and
per node, with room kept for friends (:mod:`p2pbackup.node.admission`, whose
:class:`~p2pbackup.node.admission.ServerLimits` holds every bound), and the
memory a download holds while its reader is slow.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from p2pbackup.core import crypto, delegation
from p2pbackup.errors import (
    DelegationError,
    IntegrityError,
    MerkleError,
    P2PBackupError,
    ProtocolError,
    RemoteProtocolError,
    ShardNotFoundError,
    SignatureError,
    StoreError,
    StoreFullError,
    StoreRequestError,
    UsageError,
)
from p2pbackup.model import DelegationCertificate
from p2pbackup.net.network import Address, peer_address
from p2pbackup.node import shardhost
from p2pbackup.node.admission import Admission, LogThrottle, ServerLimits, Session, source_of
from p2pbackup.node.reachability import DialBacker
from p2pbackup.wire import messages
from p2pbackup.wire.direct import DirectUpgrade, answer_direct
from p2pbackup.wire.messages import RefusalCode
from p2pbackup.wire.relay import Tunnel
from p2pbackup.wire.rpc import MessageChannel
from p2pbackup.wire.session import Identity, SecureStream, secure_responder

log = logging.getLogger(__name__)

_DEFAULT_LIMITS = ServerLimits()
#: The longest lease a stranger is granted: a year and a month, a little
#: more than the year p2pbackup owners ask for and renew monthly.
STRANGER_LEASE_SECONDS = 400 * 86400

#: What a delegated session may ask for its owner: keeping shards alive,
#: finding and reading them (ciphertext) to rebuild others, and another
#: delegate's repair log of the owner. Never a delete or a root record.
DELEGATE_REQUESTS: tuple[type[messages.Message], ...] = (
    messages.PutShard,
    messages.GetShard,
    messages.HasShard,
    messages.ListShards,
    messages.Audit,
    messages.RenewLease,
    messages.GetUsage,
    messages.GetRepairLog,
)

#: Answers a relay request (peer's node id, the request); the session is its
#: until it returns.
RelayHandler = Callable[[MessageChannel, bytes, messages.Message, Address | None], Awaitable[None]]


class StorageServer:
    """Serves the storage protocol from ``host`` as the node ``identity``."""

    def __init__(
        self,
        host: shardhost.ShardHost,
        identity: Identity,
        *,
        limits: ServerLimits = _DEFAULT_LIMITS,
        admits: Callable[[bytes], bool] | None = None,
        friends: Callable[[bytes], bool] | None = None,
        leaving: Callable[[bytes], bool] | None = None,
        stranger_lease: int = STRANGER_LEASE_SECONDS,
        dial_back: DialBacker | None = None,
        relay: RelayHandler | None = None,
        repair_log: Callable[[bytes], bytes | None] | None = None,
        direct: DirectUpgrade | None = None,
    ) -> None:
        self.host = host
        self.identity = identity
        self.limits = limits
        #: Whether a node may store new data here (None: any node may). A
        #: node not admitted can still read, list and delete what it has.
        self.admits = admits
        #: Whether a node is a friend, whose sessions come first (None: the
        #: nodes ``admits`` admits; with neither, every node is a stranger).
        self.friends = friends if friends is not None else admits
        #: Records that a node which stores for us is leaving; whether it is
        #: one of our peers (None: such notices are refused).
        self.leaving = leaving
        #: Seconds of lease a node that is not a friend is granted at most.
        self.stranger_lease = stranger_lease
        #: Dials a friend back for its reachability check (None: refused).
        self.dial_back = dial_back
        #: Takes a session that opens with a relay request (None: this node
        #: relays for nobody); see :mod:`p2pbackup.node.relay`.
        self.relay = relay
        #: The sealed repair log this node, as a delegate, keeps for an owner
        #: (None: this node keeps none); called in a worker thread.
        self.repair_log = repair_log
        #: This node's direct upgrades, for sessions that come through a
        #: relay (None: it offers none, and still answers the exchange).
        self.direct = direct
        self.admission = Admission(limits)
        self._throttle = LogThrottle()
        self._handshake_scopes: dict[object, trio.CancelScope] = {}

    @property
    def active_sessions(self) -> int:
        """Connections being served now (handshakes included)."""
        return self.admission.handshaking + self.admission.sessions

    def _log(self, kind: str, level: int, message: str, *args: object) -> None:
        """Log through the throttle (admission module docstring)."""
        allowed, held_back = self._throttle.allow(kind, trio.current_time())
        if not allowed:
            return
        if held_back:
            message += " (and %d more like it since the last one logged)"
            args = (*args, held_back)
        log.log(level, message, *args)

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one incoming connection until it ends; never raises for a peer's fault.

        A :class:`~p2pbackup.wire.relay.Tunnel` (a circuit through a relay)
        opens with the direct upgrade's exchange (:mod:`p2pbackup.wire.direct`).
        """
        address = peer_address(stream)
        secure = await self._handshake(stream, source_of(None if address is None else address.host))
        if secure is None:
            return
        await self._serve_secure(secure, address, stream if isinstance(stream, Tunnel) else None)

    async def _serve_secure(
        self, secure: SecureStream, address: Address | None, tunnel: Tunnel | None
    ) -> None:
        """Admit the session of a completed handshake and serve it."""
        source = source_of(None if address is None else address.host)
        owner = secure.remote_node_id
        friend = self.friends is not None and self.friends(owner)
        session = self.admission.admit(source, owner, friend=friend)
        if not isinstance(session, Session):
            self._log(
                f"turned away: {session.kind}",
                logging.WARNING,
                "turned a connection away: %s",
                session.reason,
            )
            await trio.aclose_forcefully(secure)
            return
        idle = self.admission.idle_limit(session)
        try:
            if tunnel is None:
                await self.serve_session(
                    secure, owner, secure.remote_signing_key, idle=idle, observed=address
                )
            else:
                await self._serve_relayed(secure, tunnel, idle)
        finally:
            self.admission.end_session(session)

    async def _serve_relayed(self, secure: SecureStream, tunnel: Tunnel, idle: float) -> None:
        """Serve a session through a relay: the upgrade's exchange first, then
        the relayed session and, if the upgrade makes one, the direct one."""
        owner = secure.remote_node_id
        if self.direct is not None:
            self.direct.observe(tunnel.observed, tunnel.local)

        async def serve_direct(direct: SecureStream) -> None:
            await self._serve_secure(direct, peer_address(direct.transport_stream), None)

        async with trio.open_nursery() as nursery:
            try:
                stream = await answer_direct(
                    secure,
                    owner,
                    upgrade=self.direct,
                    timeout=self.limits.handshake,
                    serve_direct=serve_direct,
                    nursery=nursery,
                )
            except (ProtocolError, IntegrityError, trio.BrokenResourceError) as exc:
                self._log("session closed", logging.INFO, "relayed session closed: %s", exc)
                await trio.aclose_forcefully(secure)
                return
            except trio.TooSlowError:
                self._log("session timeout", logging.INFO, "relayed session timed out")
                await trio.aclose_forcefully(secure)
                return
            await self.serve_session(stream, owner, secure.remote_signing_key, idle=idle)

    async def _handshake(self, stream: trio.abc.Stream, source: str) -> SecureStream | None:
        """The session of a completed handshake; None (the stream closed) if
        it failed, timed out or was displaced."""
        handshake, displaced = self.admission.begin_handshake(source)
        if displaced is not None:
            self._handshake_scopes.pop(displaced).cancel()
            self._log(
                "displaced",
                logging.WARNING,
                "closed a connection from %s whose handshake was not over: "
                "%d handshakes at once are the most (%d from one source)",
                displaced.source,
                self.limits.handshakes,
                self.limits.handshakes_per_source,
            )
        scope = self._handshake_scopes[handshake] = trio.CancelScope()
        try:
            with scope, trio.fail_after(self.limits.handshake):
                return await secure_responder(stream, self.identity)
        except trio.TooSlowError:
            self._log("handshake timeout", logging.INFO, "handshake timed out")
        except (ProtocolError, IntegrityError, trio.BrokenResourceError) as exc:
            self._log("handshake failed", logging.INFO, "handshake failed: %s", exc)
        finally:
            self.admission.end_handshake(handshake)
            self._handshake_scopes.pop(handshake, None)
        # Displaced (the scope caught its cancellation), failed or timed out;
        # secure_responder has closed the stream in each case.
        await trio.aclose_forcefully(stream)
        return None

    async def serve_session(
        self,
        stream: trio.abc.Stream,
        owner: bytes,
        owner_signing_key: bytes,
        *,
        idle: float | None = None,
        observed: Address | None = None,
    ) -> None:
        """Answer the requests of the peer ``owner`` (node id, and its Ed25519 key),
        allowing it ``idle`` seconds between requests (default: a friend's);
        ``observed`` is where its connection came from.

        The caller vouches for who is at the other end: :meth:`handle_connection`
        passes a Noise session, whose handshake proved it; benchmarks pass a
        plain stream to measure what the session costs.
        """
        session = _Session(
            self, stream, owner, owner_signing_key, self.limits.idle if idle is None else idle
        )
        session.observed = observed
        try:
            await session.run()
        except (RemoteProtocolError, IntegrityError) as exc:
            self._log(
                "session closed", logging.INFO, "session with %s closed: %s", session.peer_name, exc
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._log(
                "session lost", logging.INFO, "session with %s lost: %s", session.peer_name, exc
            )
        except trio.TooSlowError:
            self._log(
                "session timeout", logging.INFO, "session with %s timed out", session.peer_name
            )
        finally:
            await trio.aclose_forcefully(stream)


class _Refusal(Exception):
    """Internal: end this request with a refusal; the session goes on."""

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refusal_for(exc: Exception) -> _Refusal:
    """The refusal that tells a peer what went wrong with the host."""
    if isinstance(exc, ShardNotFoundError):
        return _Refusal(RefusalCode.NOT_FOUND, str(exc))
    if isinstance(exc, StoreFullError):
        return _Refusal(RefusalCode.FULL, str(exc))
    if isinstance(exc, shardhost.ShardConflictError):
        return _Refusal(RefusalCode.CONFLICT, str(exc))
    if isinstance(exc, MerkleError):
        return _Refusal(RefusalCode.INTEGRITY, str(exc))
    if isinstance(exc, StoreRequestError):
        return _Refusal(RefusalCode.BAD_REQUEST, str(exc))
    if isinstance(exc, StoreError):
        return _Refusal(RefusalCode.INTERNAL, str(exc))
    raise exc


class _Session:
    def __init__(
        self,
        server: StorageServer,
        stream: trio.abc.Stream,
        owner: bytes,
        owner_key: bytes,
        idle: float,
    ) -> None:
        self.server = server
        self.host = server.host
        self.limits = server.limits
        self.idle = idle
        #: Whose namespace requests touch: the peer's own, or in a delegated
        #: session the owner it acts for.
        self.owner = owner
        #: The session's peer (proved by the handshake), whose key signs
        #: its statements.
        self.peer = owner
        self.owner_key = owner_key
        self.peer_name = owner.hex()[:16]
        #: The certificate a delegated session acts under (None: its own).
        self.delegation: DelegationCertificate | None = None
        self.channel = MessageChannel(stream)
        self.observed: Address | None = None

    async def run(self) -> None:
        handlers: dict[type, Callable[[Any], Awaitable[None]]] = {
            messages.PutShard: self._put_shard,
            messages.GetShard: self._get_shard,
            messages.HasShard: self._has_shard,
            messages.Audit: self._audit,
            messages.ListShards: self._list_shards,
            messages.RenewLease: self._renew_lease,
            messages.DeleteShard: self._delete_shard,
            messages.PutRoot: self._put_root,
            messages.GetRoot: self._get_root,
            messages.GetUsage: self._get_usage,
            messages.DeleteAll: self._delete_all,
            messages.Leaving: self._leaving,
            messages.DialBack: self._dial_back,
            messages.Delegate: self._delegate,
            messages.RevokeDelegate: self._revoke_delegate,
            messages.PutGrant: self._put_grant,
            messages.GetRepairLog: self._get_repair_log,
        }
        while True:
            with trio.fail_after(self.idle):
                request = await self.channel.receive_or_end()
            if request is None:
                return
            if self.delegation is not None and messages.is_request(request):
                try:
                    await self._check_delegated(request)
                except _Refusal as refusal:
                    await self._send(messages.Refused(refusal.code, refusal.message[:1000]))
                    continue
            if isinstance(request, messages.RELAY_REQUEST_TYPES):
                await self._relay(request)
                return
            handler = handlers.get(type(request))
            if handler is None:
                raise RemoteProtocolError(
                    f"{type(request).__name__} is not a request this server answers"
                )
            try:
                await handler(request)
            except _Refusal as refusal:
                await self._send(messages.Refused(refusal.code, refusal.message[:1000]))

    async def _relay(self, request: messages.Message) -> None:
        """Hand the session to the relay, which keeps it until it is done."""
        if self.server.relay is None:
            await self._send(
                messages.Refused(
                    RefusalCode.FORBIDDEN,
                    f"node {self.server.identity.node_id.hex()} relays for nobody",
                )
            )
            return
        await self.server.relay(self.channel, self.owner, request, self.observed)

    async def _send(self, message: messages.Message) -> None:
        # A peer that stops reading must not hold this session forever.
        with trio.fail_after(self.limits.transfer):
            await self.channel.send(message)

    async def _call(self, function: Callable[..., object], *args: object) -> object:
        """Run a host method in a worker thread; its failures become refusals."""
        try:
            return await trio.to_thread.run_sync(function, *args)
        except (StoreError, MerkleError) as exc:
            raise _refusal_for(exc) from None

    def _check_signature(self, statement: bytes, signature: bytes, what: str) -> None:
        try:
            crypto.verify(self.owner_key, statement, signature)
        except SignatureError:
            signer = "owner" if self.delegation is None else "delegate"
            raise _Refusal(
                RefusalCode.FORBIDDEN, f"{what}: the {signer}'s signature does not verify"
            ) from None

    # -- delegation -------------------------------------------------------------

    async def _check_certificate(
        self, certificate: DelegationCertificate, *, delegate: bytes
    ) -> None:
        """Refuse unless ``certificate`` lets ``delegate`` act now and is not revoked."""
        try:
            delegation.check_certificate(certificate, now=self.host.now(), delegate=delegate)
        except DelegationError as error:
            raise _Refusal(RefusalCode.FORBIDDEN, str(error)) from None
        revoked = await self._call(self.host.revoked_before, certificate.owner, delegate)
        assert isinstance(revoked, int)
        if certificate.issued_at < revoked:
            raise _Refusal(
                RefusalCode.FORBIDDEN,
                f"node {certificate.owner.hex()} revoked its delegation to node {delegate.hex()}",
            )

    async def _check_delegated(self, request: messages.Message) -> None:
        """A delegated session's request: one a delegate may make, under a
        certificate still good (module docstring)."""
        assert self.delegation is not None
        owner = self.delegation.owner.hex()
        if not isinstance(request, DELEGATE_REQUESTS):
            raise _Refusal(
                RefusalCode.FORBIDDEN,
                f"a delegate of node {owner} may audit, renew, put, list and read its shards; "
                f"{type(request).__name__} is refused",
            )
        await self._check_certificate(self.delegation, delegate=self.peer)

    async def _delegate(self, request: messages.Delegate) -> None:
        if self.delegation is not None:
            raise _Refusal(
                RefusalCode.BAD_REQUEST,
                f"this session acts for node {self.delegation.owner.hex()} already",
            )
        try:
            certificate = delegation.open_certificate(request.certificate)
        except IntegrityError as error:
            raise _Refusal(RefusalCode.FORBIDDEN, str(error)) from None
        await self._check_certificate(certificate, delegate=self.peer)
        self.delegation = certificate
        self.owner = certificate.owner
        log.info("%s acts as a delegate of %s", self.peer_name, certificate.owner.hex()[:16])
        await self._send(messages.Delegated(certificate.owner, certificate.expiry))

    async def _revoke_delegate(self, request: messages.RevokeDelegate) -> None:
        await self._call(self.host.revoke_delegate, self.owner, request.delegate, request.before)
        if request.delegate == self.server.identity.node_id:
            # This node is the delegate dropped: the grant goes too.
            await self._call(self.host.drop_grant, self.owner)
        await self._send(messages.DelegateRevoked())

    async def _get_repair_log(self, _request: messages.GetRepairLog) -> None:
        if self.server.repair_log is None:
            raise _Refusal(RefusalCode.BAD_REQUEST, "this node keeps no repair logs")
        try:
            data = await trio.to_thread.run_sync(self.server.repair_log, self.owner)
        except P2PBackupError as error:
            raise _Refusal(RefusalCode.INTERNAL, f"could not read the log: {error}") from None
        await self._send(messages.RepairLogData(data))

    async def _put_grant(self, request: messages.PutGrant) -> None:
        self._check_admitted()
        me = self.server.identity.node_id
        try:
            grant = delegation.open_grant(request.grant, owner=self.owner)
            certificate = delegation.open_certificate(request.certificate)
            if certificate.owner != self.owner:
                raise DelegationError(
                    f"the certificate is of node {certificate.owner.hex()}, not of the sender"
                )
        except IntegrityError as error:
            raise _Refusal(RefusalCode.FORBIDDEN, str(error)) from None
        await self._check_certificate(certificate, delegate=me)
        held = await self._call(
            self.host.put_grant, self.owner, grant.sequence, request.grant, request.certificate
        )
        assert isinstance(held, int)
        if held != grant.sequence:
            raise _Refusal(
                RefusalCode.CONFLICT,
                f"holds a grant of sequence {held}, newer than {grant.sequence}",
            )
        await self._send(messages.GrantStored(held))

    # -- requests ---------------------------------------------------------------

    def _lease(self, asked: int) -> int:
        """The lease granted for ``asked`` seconds (module docstring)."""
        friends = self.server.friends
        if friends is not None and friends(self.owner):
            return asked
        return min(asked, self.server.stranger_lease)

    def _check_admitted(self) -> None:
        admits = self.server.admits
        if admits is not None and not admits(self.owner):
            raise _Refusal(
                RefusalCode.FORBIDDEN,
                f"node {self.server.identity.node_id.hex()} stores only for its friends; "
                f"its owner must add node {self.owner.hex()} with `p2pbackup friend add`",
            )

    async def _put_shard(self, request: messages.PutShard) -> None:
        self._check_admitted()
        self._check_signature(
            messages.put_statement(
                self.server.identity.node_id,
                request.shard_id,
                request.size,
                request.merkle_root,
                request.lease_seconds,
            ),
            request.signature,
            "put",
        )
        upload = await self._call(
            self.host.begin_put,
            self.owner,
            request.shard_id,
            request.size,
            request.block_size,
            request.merkle_root,
            self._lease(request.lease_seconds),
        )
        if upload is None:
            info = await self._call(self.host.info, self.owner, request.shard_id)
            assert isinstance(info, shardhost.HostedShard)
            await self._send(messages.Stored(request.shard_id, info.lease_expiry))
            return
        assert isinstance(upload, shardhost.Upload)
        try:
            await self._send(messages.Ready())
            failure = await self._receive_pieces(upload, request.size)
            if failure is None:
                expiry = await self._call(upload.commit)
                assert isinstance(expiry, int)
                await self._send(messages.Stored(request.shard_id, expiry))
                return
        finally:
            upload.abort()
        raise failure

    async def _receive_pieces(self, upload: shardhost.Upload, size: int) -> _Refusal | None:
        """Take ``size`` bytes of pieces into ``upload``; the refusal if writing failed.

        A failed write does not end the exchange early: the peer has already
        sent its pieces, so they are read (and dropped) to keep the session in
        step, and the refusal is the answer.
        """
        received = 0
        failure: _Refusal | None = None
        started = trio.current_time()
        while received < size:
            # Past the first piece's time, a trickle that falls behind the
            # minimum rate ends the session, and the reservation with it.
            deadline = self.limits.upload_deadline(started, received, trio.current_time())
            with trio.fail_at(deadline):
                piece = await self.channel.receive()
            if not isinstance(piece, messages.ShardPiece):
                raise RemoteProtocolError(
                    f"expected a shard piece during an upload, got {type(piece).__name__}"
                )
            received += len(piece.data)
            if received > size:
                raise RemoteProtocolError(f"upload longer than the {size} bytes declared")
            if failure is None:
                try:
                    await self._call(upload.write, piece.data)
                except _Refusal as refusal:
                    failure = refusal
        return failure

    async def _get_shard(self, request: messages.GetShard) -> None:
        info = await self._call(self.host.info, self.owner, request.shard_id)
        if info is None:
            raise _Refusal(RefusalCode.NOT_FOUND, f"no shard {request.shard_id.hex()[:16]}")
        assert isinstance(info, shardhost.HostedShard)
        start = min(request.offset, info.size)
        end = info.size if request.length is None else min(info.size, start + request.length)
        await self._send(messages.ShardData(end - start))
        position = start
        while position < end:
            # One piece at a time, each read only once the last one has been
            # taken: a reader that stops reading holds one piece of memory.
            length = min(self.limits.download_piece, end - position)
            try:
                data = await trio.to_thread.run_sync(
                    self.host.read, self.owner, request.shard_id, position, length
                )
            except StoreError as exc:
                # Too late for a refusal: the size is promised. End the session,
                # which the peer sees as this host failing.
                raise RemoteProtocolError(f"shard vanished while being read: {exc}") from None
            if len(data) != length:
                raise RemoteProtocolError("shard shrank while being read")
            # Sealed straight from the bytes read, as an upload's pieces are.
            with trio.fail_after(self.limits.transfer):
                await self.channel.send_piece(data)
            position += length

    async def _has_shard(self, request: messages.HasShard) -> None:
        present = await self._call(self.host.has, self.owner, request.shard_id)
        await self._send(messages.ShardStatus(bool(present)))

    async def _audit(self, request: messages.Audit) -> None:
        info = await self._call(self.host.info, self.owner, request.shard_id)
        if info is None:
            raise _Refusal(RefusalCode.NOT_FOUND, f"no shard {request.shard_id.hex()[:16]}")
        assert isinstance(info, shardhost.HostedShard)
        if not messages.audit_answer_fits(len(request.indices), info.block_size):
            raise _Refusal(
                RefusalCode.BAD_REQUEST,
                f"an answer of {len(request.indices)} blocks of {info.block_size} bytes "
                "would not fit in one frame; ask for fewer blocks at a time",
            )
        answers = await self._call(self.host.audit, self.owner, request.shard_id, request.indices)
        assert isinstance(answers, list)
        await self._send(
            messages.AuditProof(
                request.nonce,
                tuple(block for block, _proof in answers),
                tuple(tuple(proof) for _block, proof in answers),
            )
        )

    async def _list_shards(self, request: messages.ListShards) -> None:
        result = await self._call(self.host.list, self.owner, request.after, request.limit)
        assert isinstance(result, tuple)
        shards, more = result
        await self._send(
            messages.ShardList(
                tuple(messages.ShardEntry(s.shard_id, s.size, s.lease_expiry) for s in shards),
                bool(more),
            )
        )

    async def _renew_lease(self, request: messages.RenewLease) -> None:
        # Keeping data longer is storing it: a node no longer a friend may
        # read, list and delete what it has, and its leases run out.
        self._check_admitted()
        self._check_signature(
            messages.renew_statement(
                self.server.identity.node_id, request.shard_ids, request.lease_seconds
            ),
            request.signature,
            "renew",
        )
        result = await self._call(
            self.host.renew, self.owner, request.shard_ids, self._lease(request.lease_seconds)
        )
        assert isinstance(result, tuple)
        expiry, missing = result
        await self._send(messages.LeaseRenewed(expiry, tuple(missing)))

    async def _delete_shard(self, request: messages.DeleteShard) -> None:
        self._check_signature(
            messages.delete_statement(self.server.identity.node_id, request.shard_id),
            request.signature,
            "delete",
        )
        existed = await self._call(self.host.delete, self.owner, request.shard_id)
        await self._send(messages.Deleted(bool(existed)))

    async def _delete_all(self, request: messages.DeleteAll) -> None:
        self._check_signature(
            messages.delete_all_statement(self.server.identity.node_id),
            request.signature,
            "delete all",
        )
        result = await self._call(self.host.delete_owner, self.owner)
        assert isinstance(result, tuple)
        shards, root = result
        log.info("deleted the %d shards of %s at its request", shards, self.peer_name)
        await self._send(messages.AllDeleted(shards, root))

    async def _leaving(self, _request: messages.Leaving) -> None:
        if self.server.leaving is None:
            raise _Refusal(RefusalCode.BAD_REQUEST, "this node keeps no record of leaving peers")
        try:
            known = await trio.to_thread.run_sync(self.server.leaving, self.owner)
        except P2PBackupError as error:
            raise _Refusal(RefusalCode.INTERNAL, f"could not record it: {error}") from None
        log.info("node %s says it is leaving the network", self.owner.hex())
        await self._send(messages.Noted(known))

    async def _put_root(self, request: messages.PutRoot) -> None:
        self._check_admitted()
        await self._call(self.host.put_root, self.owner, request.data)
        await self._send(messages.RootStored())

    async def _get_root(self, _request: messages.GetRoot) -> None:
        data = await self._call(self.host.get_root, self.owner)
        assert data is None or isinstance(data, bytes)
        await self._send(messages.RootData(data))

    async def _get_usage(self, _request: messages.GetUsage) -> None:
        admits = self.server.admits
        if admits is not None and not admits(self.owner):
            # Refused new data: no room is offered beyond what it has.
            used = await self._call(self.host.usage, self.owner)
            assert isinstance(used, int)
            await self._send(messages.Usage(used, used))
            return
        result = await self._call(self.host.space, self.owner)
        assert isinstance(result, tuple)
        used, offered = result
        await self._send(messages.Usage(used, offered))

    # -- reachability -----------------------------------------------------------

    async def _dial_back(self, request: messages.DialBack) -> None:
        """Dial a friend back at the addresses it names (node.reachability)."""
        friends = self.server.friends
        dial_back = self.server.dial_back
        if dial_back is None or friends is None or not friends(self.owner):
            raise _Refusal(RefusalCode.FORBIDDEN, "this node dials back only its friends")
        observed = self.observed.host if self.observed is not None else None
        try:
            reachable = await dial_back(self.owner, observed, request.addresses)
        except UsageError as error:
            raise _Refusal(RefusalCode.FORBIDDEN, str(error)) from None
        await self._send(messages.DialBackResult(reachable))
