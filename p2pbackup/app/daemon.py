"""The node: the composition root that wires a home to the network.

Nouns:

* **node** — one home seen from the network: its identity (from the master
  secret), its shard host (the shards it keeps for peers, under
  ``HOME/hosted``) and the storage server answering peers on a listening
  address.
* **serve options** — :class:`ServeOptions`: where to listen and how much
  space to give. Sizes are bytes; None means no limit beyond the disk.
* **friend gate** — :class:`FriendGate`: by default a node stores new data
  only for the home's friends; ``open`` lets any node store (within quotas).
* **DHT role** — the node also takes part in the Kademlia DHT on UDP at the
  same host and port as its TCP listener (:mod:`p2pbackup.dht.discovery`): it
  publishes its contact record there and follows its friends.
* **role** — each task a started node runs side by side: the storage server
  (one task per connection), the hourly collection of expired shards,
  discovery, the scheduled backups and the control socket (one task per
  client). What goes wrong in one run of a role (a connection, a client, a
  backup, a collection) is logged and the role goes on. A failure that ends
  a role ends the node: its last log line says why (``serve stopped: …``),
  and the control socket is left behind, so that the CLI tells the user
  that ``serve`` stopped instead of quietly running commands itself. A stop
  by cancellation (SIGTERM, Ctrl-C) removes the socket. The caller may add
  **extra roles** (:data:`ExtraRole`: the dashboard, from a layer above).
* **backup record** — :class:`BackupRecord`: when the scheduled backups last
  started, succeeded or failed and when the next one is due, as the running
  node knows it (what the dashboard and the alerts read).

Everything below is passed in — the network above all — so that tests and the
simulator run this same code over an in-memory network.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence

import attrs
import trio

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.app.homedht import home_friends, home_root_holders
from p2pbackup.app.service import error_message
from p2pbackup.core.keys import Keyring
from p2pbackup.dht import adapter as dht
from p2pbackup.dht.discovery import (
    DEFAULT_REFRESH_PERIOD,
    SERVING_NODE,
    Discovery,
    DiscoveryOptions,
    advertised_addresses,
)
from p2pbackup.dht.records import RecordAddress
from p2pbackup.engine.backup import Backup
from p2pbackup.errors import RepositoryLockedError
from p2pbackup.net.network import Address, Network, TcpNetwork
from p2pbackup.node.control import ControlRequest, Handler, LineSink, Outcome, serve_control
from p2pbackup.node.schedule import RUNNING_OFFER, BackupSchedule, StorageOffer, load_schedule
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ReconcileReport, ShardHost
from p2pbackup.nurseries import unwrap_single
from p2pbackup.wire.session import Identity

log = logging.getLogger(__name__)

#: Port a node listens on unless told otherwise.
DEFAULT_PORT = 47470
#: How often shards whose lease ran out are deleted.
EXPIRY_INTERVAL = 3600.0


#: Every interface, the default port.
DEFAULT_LISTEN = Address("0.0.0.0", DEFAULT_PORT)


@attrs.frozen
class ServeOptions:
    listen: Address = DEFAULT_LISTEN
    capacity: int | None = None
    owner_quota: int | None = None
    #: DHT nodes to join through, besides friends and remembered neighbours.
    bootstrap: tuple[Address, ...] = ()
    #: Addresses published in the contact record; empty: worked out from ``listen``.
    advertise: tuple[Address, ...] = ()
    #: Seconds between DHT refreshes (republish, follow friends).
    refresh_period: float = DEFAULT_REFRESH_PERIOD
    #: Store for any node that asks (within quotas), not only for friends.
    open: bool = False


@attrs.define
class BackupRecord:
    """What the scheduled backups of a running node did (unix seconds; None: not yet)."""

    last_started: float | None = None
    last_succeeded: float | None = None
    last_failed: float | None = None
    #: The one line that says why the last failed run failed.
    last_error: str = ""
    next_at: float | None = None
    #: Seconds between runs; None: nothing is scheduled.
    interval: float | None = None


@attrs.frozen
class Serving:
    """What a started node reports: who it is, where it listens, what it found."""

    node_id: bytes
    address: Address
    reconciled: ReconcileReport
    #: Addresses in the contact record (what `invite` hands out).
    advertised: tuple[str, ...] = ()
    discovery: Discovery | None = None
    backups: BackupRecord = attrs.Factory(BackupRecord)


#: A role the caller adds to a node: started (``nursery.start``) once the
#: node's own roles run, with what the node reports; it calls
#: ``task_status.started()`` once it is ready, and the node reports itself
#: started only after every extra role did.
ExtraRole = Callable[..., Awaitable[None]]


def node_identity(home: Home) -> Identity:
    """The identity a home presents to its peers."""
    return Identity.from_keyring(Keyring.from_master_secret(home.load_secret()))


async def serve(
    home: Home,
    options: ServeOptions,
    *,
    network: Network | None = None,
    control: Handler | None = None,
    extra_roles: Sequence[ExtraRole] = (),
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Store shards for peers until cancelled; with ``control``, also answer
    the CLI on the home's control socket (it runs their commands); each of
    ``extra_roles`` is started beside them (:data:`ExtraRole`).

    The steps, each below: open the shard host and start the storage server
    (:func:`_open_storage`), join the DHT (:func:`_join_dht`), then run the
    node's roles side by side: discovery, the scheduled backups, the control
    socket. How it stops: :func:`_stopping`."""
    network = network if network is not None else TcpNetwork()
    home.require()
    schedule = load_schedule(home.config_path)  # a bad config stops serve before it starts
    with home.serving(), _stopping(home) as stop:
        identity = node_identity(home)
        async with (
            _open_storage(home, options, identity, network) as storage,
            _join_dht(home, options, identity, network, storage.address.port) as discovery,
            trio.open_nursery() as roles,
        ):
            # Backups and the CLI's commands (tasks started below inherit it)
            # look nodes up through this running node.
            SERVING_NODE.set(discovery.node)
            RUNNING_OFFER.set(StorageOffer(options.capacity, options.owner_quota))
            await roles.start(discovery.run)
            # A backup or a command may have changed which nodes hold the root record.
            peers_changed = discovery.root_holders_may_have_changed
            serving = Serving(
                identity.node_id,
                storage.address,
                storage.host.reconcile_report,
                _address_texts(discovery.advertised),
                discovery,
            )
            if schedule is not None:
                roles.start_soon(
                    functools.partial(
                        run_scheduled_backups,
                        home,
                        schedule,
                        network,
                        peers_changed,
                        record=serving.backups,
                    )
                )
            if control is not None:
                await roles.start(serve_control, home.control_path, _then(control, peers_changed))
            for role in extra_roles:
                await roles.start(role, serving)
            task_status.started(serving)
            stop.started = True


@attrs.define
class _Stop:
    #: Whether the node got as far as reporting itself started.
    started: bool = False


@contextlib.contextmanager
def _stopping(home: Home) -> Iterator[_Stop]:
    """Around a node: once it has started, a failure that ends it is its last
    log line; unless it failed, its control socket is removed (one left
    behind tells the CLI that ``serve`` stopped unexpectedly)."""
    stop = _Stop()
    failed = False
    try:
        yield stop
    except Exception as error:
        failed = True
        if stop.started:  # before, the command line reports it
            _log_stop(error)
        raise
    finally:
        if not failed:
            with contextlib.suppress(FileNotFoundError):
                home.control_path.unlink()


def _log_stop(error: Exception) -> None:
    """The last log line of a node that ``error`` ended."""
    message = error_message(error)
    if message is None:
        log.critical("serve stopped by an unexpected error (a bug)", exc_info=error)
    else:
        log.critical("serve stopped: %s", message)


@attrs.frozen
class _Storage:
    """The storage role of a started node."""

    host: ShardHost
    #: Where the storage server listens (its port chosen, if 0 was asked for).
    address: Address


@contextlib.asynccontextmanager
async def _open_storage(
    home: Home, options: ServeOptions, identity: Identity, network: Network
) -> AsyncIterator[_Storage]:
    """The home's shard host, and a storage server answering peers from it on
    ``options.listen``; shards whose lease ran out are deleted every hour. The
    host is closed once the server has stopped."""
    host = await trio.to_thread.run_sync(
        functools.partial(
            ShardHost.open,
            home.hosted_path,
            capacity=options.capacity,
            owner_quota=options.owner_quota,
        )
    )
    try:
        # Friends come first for sessions in open mode too.
        friends = FriendGate(home)
        server = StorageServer(
            host, identity, admits=None if options.open else friends, friends=friends
        )
        async with trio.open_nursery() as nursery:
            address = await nursery.start(network.serve, options.listen, server.handle_connection)
            nursery.start_soon(_collect_expired, host)
            yield _Storage(host, address)
    finally:
        host.close()


@contextlib.asynccontextmanager
async def _join_dht(
    home: Home, options: ServeOptions, identity: Identity, network: Network, port: int
) -> AsyncIterator[Discovery]:
    """The node's DHT role (not yet running), on UDP at the storage server's
    ``port``; the addresses it will publish are written to the home for
    ``invite``."""
    advertised = advertised_addresses(options.listen, port, options.advertise)
    # UDP on the TCP port: one address (and one firewall rule) per node.
    dht_address = Address(options.listen.host, port)
    async with dht.open_dht(network, dht_address, node_id=identity.node_id) as node:
        discovery = Discovery(
            node,
            identity,
            advertised,
            options=DiscoveryOptions(
                refresh_period=options.refresh_period,
                bootstrap=options.bootstrap,
                # Offered to the DHT at large only in open mode; a
                # friends-only node offers nothing to strangers.
                storage_offered=_storage_offered(home, options) if options.open else 0,
            ),
            friends=functools.partial(home_friends, home),
            root_holders=functools.partial(home_root_holders, home),
            state_path=home.dht_state_path,
        )
        home.write_addresses(_address_texts(advertised))
        yield discovery


def _address_texts(addresses: Iterable[RecordAddress]) -> tuple[str, ...]:
    return tuple(str(Address(a.host, a.port)) for a in addresses)


class FriendGate:
    """Who may store new data on this node: the home's friends.

    The friend list is read again when a node not on it asks (at most once a
    tenth of a second, so strangers cannot make it read its index in a loop) and
    every half minute anyway, so a friend added or removed while the node runs
    counts at once or soon.
    """

    REREAD_AFTER_MISS = 0.1
    REREAD_ANYWAY = 30.0

    def __init__(self, home: Home, clock: Callable[[], float] = time.monotonic) -> None:
        self.home = home
        self.clock = clock
        self._friends: frozenset[bytes] = frozenset()
        self._read_at = -math.inf

    def _read(self) -> None:
        self._friends = frozenset(friend.node_id for friend in home_friends(self.home))
        self._read_at = self.clock()

    def __call__(self, node_id: bytes) -> bool:
        age = self.clock() - self._read_at
        if age >= self.REREAD_ANYWAY or (
            node_id not in self._friends and age >= self.REREAD_AFTER_MISS
        ):
            self._read()
        return node_id in self._friends


def _then(handler: Handler, after: Callable[[], None]) -> Handler:
    """``handler``, calling ``after`` once each command it runs is over."""

    async def handle(
        request: ControlRequest, write: LineSink, progress: LineSink | None
    ) -> Outcome:
        try:
            return await handler(request, write, progress)
        finally:
            after()

    return handle


async def run_scheduled_backups(
    home: Home,
    schedule: BackupSchedule,
    network: Network,
    after_each: Callable[[], None] = lambda: None,
    *,
    record: BackupRecord | None = None,
) -> None:
    """Back up what the config says, now and then every interval, until cancelled.

    A run that cannot start (a backup from the command line holds the home)
    or fails, even by a bug, is logged, and the next one comes at its time.
    ``after_each`` is called when a run is over (the peers may have changed);
    ``record`` is kept up to date with each run.
    """
    record = record if record is not None else BackupRecord()
    record.interval = schedule.interval
    while True:
        started = trio.current_time()
        record.last_started = time.time()
        record.next_at = record.last_started + schedule.interval
        try:
            with unwrap_single():
                async with operations.open_repository(home, network=network) as repo:
                    summary = await Backup(repo, exclude=schedule.exclude).run(
                        schedule.paths, schedule.tags
                    )
        except RepositoryLockedError as error:
            log.warning("scheduled backup skipped: %s", error)
        except Exception as error:
            message = error_message(error)
            record.last_failed, record.last_error = time.time(), message or "a bug (see the log)"
            if message is None:
                log.exception("scheduled backup failed by an unexpected error (a bug)")
            else:
                log.error("scheduled backup failed: %s", message)
        else:
            record.last_succeeded = time.time()
            log.info(
                "scheduled backup saved snapshot %s: %s",
                summary.snapshot_id.hex(),
                "; ".join(summary.lines()),
            )
        after_each()
        await trio.sleep_until(started + schedule.interval)


def _storage_offered(home: Home, options: ServeOptions) -> int:
    """What the contact record says this node offers: its capacity, or with
    none set, the free space where hosted shards go."""
    if options.capacity is not None:
        return options.capacity
    try:
        return shutil.disk_usage(home.hosted_path).free
    except OSError:
        return 0


async def _collect_expired(host: ShardHost) -> None:
    while True:
        try:
            removed = await trio.to_thread.run_sync(host.collect_expired)
        except Exception:
            # The shards stay a while longer; the next round tries again.
            log.exception("deleting shards whose lease expired failed; trying again in an hour")
        else:
            if removed:
                log.info("removed %d shards whose lease expired", removed)
        await trio.sleep(EXPIRY_INTERVAL)
