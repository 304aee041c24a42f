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
  (one task per connection), the hourly collection of expired shards (a
  friend's are kept while it is a friend),
  discovery, the scheduled backups, the background maintenance of our own
  backups (:mod:`p2pbackup.maintenance.keeper`: audits, repair, leases) and the
  control socket (one task per client). What goes wrong in one run of a
  role (a connection, a client, a backup, a collection, a maintenance
  round) is logged and the role goes on. Scheduled backups and maintenance
  rounds take turns with the repository: one waits for the other instead
  of being refused. A failure that ends
  a role ends the node: its last log line says why (``serve stopped: …``),
  and the control socket is left behind, so that the CLI tells the user
  that ``serve`` stopped instead of quietly running commands itself. A stop
  by cancellation (SIGTERM, Ctrl-C) removes the socket. The caller may add
  **extra roles** (:data:`ExtraRole`: the dashboard, from a layer above).
* **backup record** — :class:`~p2pbackup.node.schedule.BackupRecord`: when
  the scheduled backups last started, succeeded or failed and when the next
  one is due, as the running node knows it (what ``status``, the dashboard
  and the alerts read).

Everything below is passed in — the network above all — so that tests and the
simulator run this same code over an in-memory network.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence

import attrs
import trio

from p2pbackup.app import delegating, operations
from p2pbackup.app.home import Home
from p2pbackup.app.homedht import (
    SERVING_RELAY,
    ServingRelay,
    home_friends,
    home_root_holders,
)
from p2pbackup.app.homenat import PublishedAddresses, has_router, keep_reachable
from p2pbackup.app.relays import keep_relays, relay_while_unreachable
from p2pbackup.app.service import error_message, local_zone, unchanged_line
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
from p2pbackup.engine.index import Index
from p2pbackup.errors import P2PBackupError, RepositoryLockedError, StoreError
from p2pbackup.maintenance import delegated, grants, keeper, leases
from p2pbackup.net.limits import limited
from p2pbackup.net.network import BOTH_FAMILIES, Address, Network, TcpNetwork
from p2pbackup.node.control import ControlRequest, Handler, LineSink, Outcome, serve_control
from p2pbackup.node.reachability import REACHABILITY, DialBackService, ReachabilityBoard
from p2pbackup.node.relay import RUNNING_RELAY, Relay
from p2pbackup.node.schedule import (
    RUNNING_BACKUPS,
    RUNNING_OFFER,
    BackupRecord,
    BackupSchedule,
    RetentionConfig,
    StorageOffer,
    load_config,
)
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ReconcileReport, ShardHost
from p2pbackup.nurseries import unwrap_single
from p2pbackup.wire.direct import DIRECT_UPGRADE, DirectUpgrade
from p2pbackup.wire.relay import Route
from p2pbackup.wire.session import Identity

log = logging.getLogger(__name__)

#: Port a node listens on unless told otherwise.
DEFAULT_PORT = 47470
#: How often shards whose lease ran out are deleted.
EXPIRY_INTERVAL = 3600.0
#: Seconds between pings to DHT neighbours behind NAT: under the 30 s after
#: which Linux's conntrack forgets an idle UDP mapping.
NAT_KEEPALIVE = 20.0


#: Every interface of both IP families (IPv4 alone where the host has no
#: IPv6), the default port.
DEFAULT_LISTEN = Address(BOTH_FAMILIES, DEFAULT_PORT)


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
    #: Ask the router to forward the port (NAT-PMP/PCP); see app.homenat.
    port_mapping: bool = True
    #: This node cannot be dialled (behind NAT): hold reservations at up to
    #: two friends, publish them as its relays, keep its UDP mapping open.
    via_relays: bool = False


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
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    extra_roles: Sequence[ExtraRole] = (),
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Store shards for peers until cancelled; with ``control``, also answer
    the CLI on the home's control socket (it runs their commands); each of
    ``extra_roles`` is started beside them (:data:`ExtraRole`).

    The steps, each below: open the shard host and start the storage server
    (:func:`_open_storage`), join the DHT (:func:`_join_dht`), then run the
    node's roles side by side: discovery, reachability (port mapping and
    dial-back, :func:`_start_reachability`), the scheduled backups, the
    maintenance of our backups (:func:`run_maintenance`) and of the owners
    this node is a delegate of (:func:`p2pbackup.app.delegating.keep_owners`),
    the control socket. How it stops: :func:`_stopping`. ``clock`` (unix
    seconds) is the node's: the maintenance's, the shard host's leases and
    the DHT records' ages (the simulator passes a virtual one); ``rng``
    (default: the system's) is the maintenance's."""
    home.require()
    config = load_config(home.config_path)  # a bad config stops serve before it starts
    # Everything the node does shares the limits of its [bandwidth] table.
    network = limited(network if network is not None else TcpNetwork(), config.bandwidth)
    operations.SERVING_NETWORK.set(network)
    schedule = config.backup
    with home.serving(), _stopping(home) as stop:
        identity = node_identity(home)
        published = PublishedAddresses()
        async with (
            _open_storage(home, options, identity, network, published, clock) as storage,
            _join_dht(home, options, identity, network, storage.address.port, clock) as discovery,
            trio.open_nursery() as roles,
        ):
            published.discovery = discovery
            # Backups and the CLI's commands (tasks started below inherit it)
            # look nodes up through this running node.
            SERVING_NODE.set(discovery.node)
            SERVING_RELAY.set(
                ServingRelay(
                    Route(storage.address.dialled_locally(), identity.node_id),
                    lambda: storage.relay.reserved,
                )
            )
            RUNNING_OFFER.set(StorageOffer(options.capacity, options.owner_quota))
            RUNNING_RELAY.set(storage.relay)
            # Sessions this node opens through a relay try the direct upgrade.
            DIRECT_UPGRADE.set(storage.direct)
            await roles.start(discovery.run)
            board = _start_reachability(roles, home, options, identity, network, discovery, storage)
            if board is not None and not options.via_relays:
                storage.direct.reachable = functools.partial(_dialled_directly, board)
            # A backup or a command may have changed which nodes hold the root record.
            peers_changed = discovery.root_holders_may_have_changed
            turns = trio.Lock()
            serving = Serving(
                identity.node_id,
                storage.address,
                storage.host.reconcile_report,
                _address_texts(discovery.advertised),
                discovery,
            )
            RUNNING_BACKUPS.set(serving.backups)
            if schedule is not None:
                roles.start_soon(
                    functools.partial(
                        run_scheduled_backups,
                        home,
                        schedule,
                        network,
                        peers_changed,
                        turns=turns,
                        record=serving.backups,
                    )
                )
            if config.maintenance.enabled:
                await roles.start(
                    functools.partial(
                        run_maintenance,
                        home,
                        config.maintenance,
                        network,
                        clock=clock,
                        rng=rng if rng is not None else random.SystemRandom(),
                        turns=turns,
                    )
                )
                # The owners this node is a delegate of, kept alive while away.
                roles.start_soon(
                    functools.partial(
                        delegating.keep_owners,
                        home,
                        network,
                        identity,
                        config.maintenance.repair_options(),
                        clock=clock,
                        rng=rng,
                    )
                )
            if control is not None:
                await roles.start(serve_control, home.control_path, _then(control, peers_changed))
            relays = functools.partial(
                keep_relays,
                network,
                identity,
                functools.partial(home_friends, home),
                storage.server.handle_connection,
                discovery.set_relays,
            )
            if options.via_relays:
                roles.start_soon(relays)
            elif board is not None:
                # Relays only while friends cannot dial this node.
                roles.start_soon(
                    relay_while_unreachable,
                    board,
                    relays,
                    functools.partial(discovery.keep_mappings_open, NAT_KEEPALIVE),
                )
            for role in extra_roles:
                await roles.start(role, serving)
            task_status.started(serving)
            stop.started = True


def _dialled_directly(board: ReachabilityBoard) -> bool:
    """Whether the last dial-back found friends reach this node directly."""
    verdict = board.verdict
    return verdict is not None and verdict.checked and bool(verdict.reachable_at)


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
    server: StorageServer
    #: Joins the node's friends to its friends that cannot be dialled.
    relay: Relay
    #: Moves sessions through relays to direct connections where it can.
    direct: DirectUpgrade


@contextlib.asynccontextmanager
async def _open_storage(
    home: Home,
    options: ServeOptions,
    identity: Identity,
    network: Network,
    published: PublishedAddresses,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[_Storage]:
    """The home's shard host, and a storage server answering peers from it on
    ``options.listen``; shards whose lease ran out are deleted every hour. The
    host is closed once the server has stopped."""
    # Friends come first for sessions in open mode too, and their shards
    # are never collected.
    friends = FriendGate(home)
    host = await trio.to_thread.run_sync(
        functools.partial(
            ShardHost.open,
            home.hosted_path,
            capacity=options.capacity,
            owner_quota=options.owner_quota,
            spare=friends.ids(),
            clock=clock,
        )
    )
    try:
        relay = Relay(identity.node_id, friends)
        direct = DirectUpgrade(network, identity)
        server = StorageServer(
            host,
            identity,
            admits=None if options.open else friends,
            friends=friends,
            leaving=functools.partial(_note_leaving, home),
            dial_back=DialBackService(network, identity, published),
            relay=relay.serve,
            repair_log=functools.partial(_repair_log, home, identity.signing_seed),
            direct=direct,
        )
        async with trio.open_nursery() as nursery:
            address = await nursery.start(network.serve, options.listen, server.handle_connection)
            direct.port = address.port
            nursery.start_soon(_collect_expired, host, friends.ids)
            yield _Storage(host, address, server, relay, direct)
    finally:
        host.close()


@contextlib.asynccontextmanager
async def _join_dht(
    home: Home,
    options: ServeOptions,
    identity: Identity,
    network: Network,
    port: int,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Discovery]:
    """The node's DHT role (not yet running), on UDP at the storage server's
    ``port``; the addresses it will publish are written to the home for
    ``invite``."""
    advertised = advertised_addresses(options.listen, port, options.advertise)
    # UDP on the TCP port: one address (and one firewall rule) per node.
    dht_address = Address(options.listen.host, port)
    async with dht.open_dht(
        network, dht_address, node_id=identity.node_id, wall_clock=clock
    ) as node:
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
                keepalive=NAT_KEEPALIVE if options.via_relays else None,
            ),
            friends=functools.partial(home_friends, home),
            root_holders=functools.partial(home_root_holders, home),
            state_path=home.dht_state_path,
        )
        home.write_addresses(_address_texts(advertised))
        yield discovery


def _start_reachability(
    roles: trio.Nursery,
    home: Home,
    options: ServeOptions,
    identity: Identity,
    network: Network,
    discovery: Discovery,
    storage: _Storage,
) -> ReachabilityBoard | None:
    """The reachability role (app.homenat), where there is a router to ask
    (not for a node on loopback); its board goes where ``status`` finds it,
    and is returned (None: no router, no role)."""
    gateway = has_router(options.listen, network)
    if gateway is None:
        return None
    board = ReachabilityBoard()
    REACHABILITY.set(board)
    roles.start_soon(
        functools.partial(
            keep_reachable,
            home,
            network,
            identity,
            discovery,
            gateway,
            storage.address.port,
            board,
            port_mapping=options.port_mapping,
            publish_addresses=lambda addresses: home.write_addresses(_address_texts(addresses)),
        )
    )
    return board


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

    def ids(self) -> frozenset[bytes]:
        """The friends' node ids, read afresh (for collection: the cache that
        admits sessions keeps its own timing, so a friend added just after
        this read is still admitted at once)."""
        return frozenset(friend.node_id for friend in home_friends(self.home))


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
    turns: trio.Lock | None = None,
    record: BackupRecord | None = None,
) -> None:
    """Back up what the config says every interval, until cancelled: the
    first run at once, unless the last run that completed is more recent
    than the interval (a restarted ``serve`` waits for the rest of it). A
    run that finds nothing changed since the last snapshot of its paths
    makes none (:mod:`p2pbackup.engine.backup`: skips if unchanged).

    A run that cannot start (a backup from the command line holds the home)
    or fails, even by a bug, is logged, and tried again sooner than the
    interval (:func:`schedule_retry`).
    After a run that completed, config.toml's ``[forget]`` policy, if any,
    is applied to the group of its snapshot (:func:`apply_scheduled_retention`).
    ``after_each`` is called when a run is over (the peers may have changed);
    ``record`` is kept up to date with each run. ``turns``, when given, is
    held around each run (module docstring: role).
    """
    record = record if record is not None else BackupRecord()
    record.interval = schedule.interval
    forget = load_config(home.config_path).forget
    wait = _rest_of_interval(home, schedule.interval)
    if wait > 0:
        record.next_at = time.time() + wait
        log.info("scheduled backup: the last run was recent; the next in %.0f s", wait)
        await trio.sleep(wait)
    failures = 0
    while True:
        started = trio.current_time()
        summary = None
        completed = False
        record.last_started = time.time()
        record.next_at = record.last_started + schedule.interval
        try:
            with unwrap_single():
                async with (
                    turns if turns is not None else contextlib.nullcontext(),
                    operations.open_repository(home, network=network) as repo,
                ):
                    summary = await Backup(
                        repo, exclude=schedule.exclude, skip_if_unchanged=True
                    ).run(schedule.paths, schedule.tags)
                    if summary.unchanged_since is None:
                        # The clock this loop reads (looked up now, not
                        # hand_out's default: a simulation's is virtual).
                        await grants.hand_out(repo, clock=time.time)
                    with repo.index.transaction():
                        repo.index.set_meta(LAST_SCHEDULED_RUN, str(time.time_ns()).encode())
        except RepositoryLockedError as error:
            log.warning("scheduled backup skipped: %s", error)
        except Exception as error:
            message = error_message(error)
            record.last_failed, record.last_error = time.time(), message or "a bug (see the log)"
            _log_failure("scheduled backup", error)
        else:
            completed = True
            record.last_succeeded = time.time()
            if summary.unchanged_since is not None:
                log.info("scheduled backup: %s", unchanged_line(summary.unchanged_since))
            else:
                log.info(
                    "scheduled backup saved snapshot %s: %s",
                    summary.snapshot_id.hex(),
                    "; ".join(summary.lines()),
                )
        if summary is not None and summary.unchanged_since is None and forget is not None:
            await apply_scheduled_retention(home, network, forget, summary.snapshot_id)
        after_each()
        failures = 0 if completed else failures + 1
        wait = schedule_retry(failures, schedule.interval)
        record.next_at = record.last_started + wait
        await trio.sleep_until(started + wait)


#: Seconds after a scheduled run that did not complete before the next try;
#: the wait doubles with each such run in a row, up to the interval.
FIRST_BACKUP_RETRY = 600.0


def schedule_retry(failures: int, interval: float) -> float:
    """Seconds from the start of a scheduled run to the next: the interval
    after a run that completed (``failures`` 0); else sooner, since what
    stopped it (friends' machines asleep or not yet up, a busy home) often
    passes within minutes, and a day without a backup is a day at risk."""
    if failures == 0:
        return interval
    return min(interval, FIRST_BACKUP_RETRY * 2.0 ** min(failures - 1, 64))


async def run_maintenance(
    home: Home,
    options: keeper.MaintenanceOptions,
    network: Network,
    *,
    clock: Callable[[], float],
    rng: random.Random,
    turns: trio.Lock | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep our backups alive until cancelled (:func:`keeper.keep
    <p2pbackup.maintenance.keeper.keep>`): audits, repair, each round on the
    repository opened as a scheduled backup opens it. A round that fails is
    logged and the next comes at its time: it never ends the node."""
    await keeper.keep(
        functools.partial(operations.open_repository, home, network=network),
        options,
        clock=clock,
        rng=rng,
        explain=error_message,
        renew=leases.renew_leases,
        lock=turns,
        task_status=task_status,
    )


def _repair_log(home: Home, identity_seed: bytes, owner: bytes) -> bytes | None:
    """The repair log this home, as ``owner``'s delegate, keeps for it (signed)."""
    path = delegated.grant_index_path(home.path, owner)
    try:
        return delegated.sealed_log(path, identity_seed, owner, int(time.time()))
    except sqlite3.Error as error:
        raise StoreError(f"cannot read the grant index {path}: {error}") from error


def _note_leaving(home: Home, node_id: bytes) -> bool:
    """A peer said it is leaving: remember it in the home's index, so that
    repair moves our shards off it; whether it is one of our peers."""
    try:
        index = Index(home.index_path, create=False)
        try:
            with index.transaction():
                return index.set_leaving(node_id.hex(), int(time.time()))
        finally:
            index.close()
    except sqlite3.Error as error:  # busy, a full disk: the notice is refused
        raise StoreError(f"cannot write the index {home.index_path}: {error}") from error


#: The index's meta key for when the last scheduled run completed (ns since the epoch).
LAST_SCHEDULED_RUN = "last_scheduled_backup_ns"


def _rest_of_interval(home: Home, interval: float) -> float:
    """Seconds until the next scheduled run is due, by when the last one
    completed (0: now, or no run completed yet)."""
    try:
        index = Index(home.index_path, create=False)
    except P2PBackupError:
        return 0.0
    try:
        raw = index.get_meta(LAST_SCHEDULED_RUN)
    finally:
        index.close()
    if raw is None:
        return 0.0
    since = (time.time_ns() - int(raw)) / 1e9
    return min(max(interval - since, 0.0), interval)


async def apply_scheduled_retention(
    home: Home, network: Network, forget: RetentionConfig, snapshot_id: bytes
) -> None:
    """Forget what the ``[forget]`` policy does not keep of the group of
    ``snapshot_id`` (a scheduled run's), then prune if it says so; what goes
    wrong is logged, and tried again after the next run."""
    from p2pbackup.engine import snapshots
    from p2pbackup.engine.prune import prune

    try:
        with unwrap_single():
            async with operations.open_repository(home, network=network, access="remove") as repo:
                decision = await snapshots.apply_retention(
                    repo,
                    forget.policy,
                    tz=local_zone(),
                    group_by=forget.group_by,
                    group_of=snapshot_id,
                )
                removed = decision.removed
                log.info(
                    "scheduled forget (%s): kept %d snapshots, forgot %d",
                    forget.policy.describe(),
                    len(decision.kept),
                    len(removed),
                )
                if removed and forget.prune:
                    pruned = await prune(repo)
                    log.info("scheduled prune: %s", "; ".join(pruned.lines()))
    except RepositoryLockedError as error:
        log.warning("scheduled forget skipped (tried again after the next run): %s", error)
    except Exception as error:
        _log_failure("scheduled forget", error)


def _log_failure(what: str, error: Exception) -> None:
    """Log a scheduled run's failure: the one line of an expected failure,
    the traceback of a bug."""
    message = error_message(error)
    if message is None:
        log.error("%s failed by an unexpected error (a bug)", what, exc_info=error)
    else:
        log.error("%s failed: %s", what, message)


def _storage_offered(home: Home, options: ServeOptions) -> int:
    """What the contact record says this node offers: its capacity, or with
    none set, the free space where hosted shards go."""
    if options.capacity is not None:
        return options.capacity
    try:
        return shutil.disk_usage(home.hosted_path).free
    except OSError:
        return 0


async def _collect_expired(host: ShardHost, friends: Callable[[], frozenset[bytes]]) -> None:
    """Every hour, delete the shards whose lease ran out, but the friends'."""
    while True:
        try:
            removed = await trio.to_thread.run_sync(host.collect_expired, friends())
        except Exception:
            # The shards stay a while longer; the next round tries again.
            log.exception("deleting shards whose lease expired failed; trying again in an hour")
        else:
            if removed:
                log.info("removed %d shards whose lease expired", removed)
        await trio.sleep(EXPIRY_INTERVAL)
