"""The keeper: the maintenance a serving home runs in the background, for ever.

Nouns:

* **round** — :func:`run_round`, one turn of the keeper with the repository
  open: audit the shards that are due (:func:`auditor.audit_due
  <p2pbackup.maintenance.auditor.audit_due>`, the auditor's schedule); then,
  when one is due (:func:`repair_due`), a repair pass that takes the audits'
  verdicts instead of reading shards back
  (:func:`repairer.with_audits <p2pbackup.maintenance.repairer.with_audits>`:
  a shard whose last audit failed counts as failed, every shard of a
  disqualified peer as removed); then the lease renewal step, if given
  (``serve`` gives :func:`~p2pbackup.maintenance.leases.renew_leases`).
  :class:`RoundReport` says what it did.
* **repair due** — a pass runs at the first round, then every
  :attr:`MaintenanceOptions.repair_interval`, and at once after a round
  whose audits failed a shard or disqualified a peer. Between passes, a
  peer unreachable for longer than the grace period turns lost at the next
  pass: a few hours late at most, against a grace of days.
* **the loop** — :func:`keep`: a first round :attr:`~MaintenanceOptions.start_delay`
  after the node starts (a scheduled backup at start goes first), then a
  round each time the next shard comes due or a repair pass is due, at
  least :data:`MIN_SLEEP` apart and at most :data:`MAX_SLEEP` (the
  auditor's longest sleep, so that new shards get their schedule). A
  round that cannot open the repository (a backup or a command holds it)
  is skipped, logged, and tried again
  :data:`LOCKED_RETRY` later; any other failure is logged in one line (a
  traceback only for a bug) and the next round comes at its time.
  Cancellation ends it; nothing else does.
* **maintenance options** — :class:`MaintenanceOptions`: the audit,
  reputation and repair policies, the repair rate and interval, and the
  flags that turn it off (``config.toml``'s ``[maintenance]`` table,
  :mod:`p2pbackup.node.schedule`).

The clock (unix seconds) and the randomness are handed in, as the auditor's
are: the daemon passes ``time.time`` and ``random.SystemRandom()``, tests
trio's virtual clock and a seeded ``random.Random``. Deciding when a pass is
due and what audits say for repair are pure; the loop only sequences them.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import NoReturn

import attrs
import trio

from p2pbackup.engine.repository import Repository
from p2pbackup.errors import RepositoryLockedError
from p2pbackup.maintenance import auditor, grants, repairer
from p2pbackup.maintenance.audit import DEFAULT_POLICY, AuditPolicy
from p2pbackup.maintenance.auditor import AuditReport, Clock
from p2pbackup.maintenance.leases import LeaseReport
from p2pbackup.maintenance.repair import RepairPolicy
from p2pbackup.maintenance.repairer import RepairOptions, RepairReport
from p2pbackup.maintenance.reputation import DEFAULT_REPUTATION, ReputationPolicy

log = logging.getLogger(__name__)

#: Six hours between repair passes when audits find nothing: four a day, so
#: a peer gone past the grace period (days) is acted on within hours, while
#: a pass (a probe and a listing per peer) stays a small cost.
DEFAULT_REPAIR_INTERVAL = 6 * 3600.0
#: Spare healthy shards below which a background pass rebuilds the shards
#: of sleeping peers too: none. In a circle of homes that sleep at night,
#: many packs are down to k healthy shards every night; rebuilding their
#: sleepers' shards then, only to delete them as surplus days later, cost
#: 3.4 times the data actually lost over 60 simulated days
#: (tests/test_maintenance_sim.py). A pass waits for sleepers within the
#: grace period; ``p2pbackup repair``, run by hand, keeps the urgency.
BACKGROUND_URGENT_SPARES = 0
#: Seconds after the node starts before the first round.
START_DELAY = 300.0
#: Seconds before a round skipped because the repository was held is tried again.
LOCKED_RETRY = 300.0
#: Rounds are at least this far apart: each asks every peer first (a probe),
#: so shards that come due within a quarter of an hour are audited together;
#: against an audit period of days, the wait costs nothing.
MIN_SLEEP = 900.0
MAX_SLEEP = auditor.MAX_SLEEP

#: Opens the home's repository for one round (held for its duration).
OpenRepository = Callable[[], contextlib.AbstractAsyncContextManager[Repository]]
#: The lease renewal step: the repository and unix seconds now.
Renew = Callable[[Repository, float], Awaitable[LeaseReport]]
#: The one line for an expected failure; None for a bug.
Explain = Callable[[BaseException], str | None]


@attrs.frozen
class MaintenanceOptions:
    """What the keeper does, and how often (module docstring)."""

    #: Whether the keeper runs at all.
    enabled: bool = True
    audits: bool = True
    repairs: bool = True
    audit: AuditPolicy = DEFAULT_POLICY
    reputation: ReputationPolicy = DEFAULT_REPUTATION
    repair: RepairPolicy = attrs.Factory(
        lambda: RepairPolicy(urgent_spares=BACKGROUND_URGENT_SPARES)
    )
    #: Bytes a second a repair pass moves (None: no limit).
    repair_rate: float | None = repairer.DEFAULT_RATE
    #: Seconds between repair passes when audits find nothing.
    repair_interval: float = DEFAULT_REPAIR_INTERVAL
    start_delay: float = START_DELAY

    def repair_options(self) -> RepairOptions:
        return RepairOptions(policy=self.repair, rate=self.repair_rate)


@attrs.define
class KeeperState:
    """What the keeper remembers between rounds."""

    #: Unix seconds of the last repair pass (None: none yet).
    last_repair: float | None = None
    #: Whether audits found something since the last pass.
    findings: bool = False


@attrs.frozen
class RoundReport:
    """What one round did: each is None when its step did not run."""

    audit: AuditReport | None = None
    repair: RepairReport | None = None
    renewed: LeaseReport | None = None
    #: Seconds until the next round.
    sleep: float = MAX_SLEEP


def repair_due(state: KeeperState, now: float, interval: float) -> bool:
    """Whether a round at ``now`` runs a repair pass (module docstring)."""
    return state.findings or state.last_repair is None or now - state.last_repair >= interval


def found_something(report: AuditReport | None) -> bool:
    """Whether an audit pass found what repair should act on at once."""
    return report is not None and bool(report.failures or report.disqualified)


def next_round(
    to_next_audit: float, state: KeeperState, now: float, options: MaintenanceOptions
) -> float:
    """Seconds until the next round: when the next shard comes due
    (``to_next_audit``) or the next repair pass is, within the bounds."""
    wait = to_next_audit if options.audits else MAX_SLEEP
    if options.repairs:
        last = now if state.last_repair is None else state.last_repair
        wait = min(wait, last + options.repair_interval - now)
    return min(max(wait, MIN_SLEEP), MAX_SLEEP)


async def run_round(
    repo: Repository,
    options: MaintenanceOptions,
    state: KeeperState,
    *,
    clock: Clock,
    rng: random.Random,
    renew: Renew | None = None,
) -> RoundReport:
    """One round on an open repository (module docstring); ``state`` is updated."""
    audit = None
    if options.audits:
        audit = await auditor.audit_due(
            repo, clock=clock, rng=rng, policy=options.audit, reputation=options.reputation
        )
        state.findings = state.findings or found_something(audit)
    repair = None
    if options.repairs and repair_due(state, clock(), options.repair_interval):
        now = clock()
        # Where delegates moved shards while this home was away, first.
        await grants.read_back(repo, clock=clock)
        repair = await repairer.repair_pass(
            repo, repairer.with_audits(options.repair_options(), repo.index), now=now
        )
        state.last_repair, state.findings = now, False
        # The delegates learn where the shards are now (maintenance.grants),
        # and get fresh certificates before theirs run out.
        moved = repair.shards_rebuilt or repair.shards_reinstated or repair.shards_deleted
        if moved or grants.grants_due(repo.index, clock()):
            await grants.hand_out(repo, clock=clock)
    renewed = None if renew is None else await renew(repo, clock())
    now = clock()
    sleep = next_round(auditor.seconds_to_next(repo.index, now), state, now, options)
    return RoundReport(audit, repair, renewed, sleep)


async def keep(
    open_repository: OpenRepository,
    options: MaintenanceOptions,
    *,
    clock: Clock,
    rng: random.Random,
    explain: Explain,
    renew: Renew | None = None,
    lock: trio.Lock | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run rounds for ever (module docstring: the loop). ``lock``, when
    given, is held around each round: the serving home's other work on the
    repository (its scheduled backups) waits for a round instead of being
    refused, and the other way round."""
    state = KeeperState()
    task_status.started()
    await trio.sleep(options.start_delay)
    while True:
        sleep = MAX_SLEEP
        try:
            async with (
                lock if lock is not None else contextlib.nullcontext(),
                open_repository() as repo,
            ):
                report = await run_round(repo, options, state, clock=clock, rng=rng, renew=renew)
        except RepositoryLockedError as error:
            log.warning("maintenance round skipped: %s", error)
            sleep = LOCKED_RETRY
        except Exception as error:
            message = explain(error)
            if message is None:
                log.exception("maintenance round failed by an unexpected error (a bug)")
            else:
                log.error("maintenance round failed: %s", message)
        else:
            _log_round(report)
            if on_round is not None:
                on_round(report)
            sleep = report.sleep
        await trio.sleep(sleep)


def _log_round(report: RoundReport) -> None:
    """What a round found and did: a line for audits that found something
    or lost contact, one for a repair pass that changed anything."""
    audit = report.audit
    if audit is not None:
        level = logging.WARNING if found_something(audit) else logging.INFO
        log.log(level, "audits: %s", "; ".join(audit.lines()))
    renewed = report.renewed
    if renewed is not None and renewed.peers:
        level = logging.WARNING if renewed.missing else logging.INFO
        log.log(level, "leases: %s", "; ".join(renewed.lines()))
    repair = report.repair
    if repair is None:
        return
    if not repair.ok:
        # Packs that wait only for sleeping peers are every night's news;
        # packs short of shards on the peers that answer are not.
        asleep = all(o.healthy + o.decision.offline >= o.decision.k for o in repair.unrecoverable)
        log.log(logging.INFO if asleep else logging.ERROR, "repair: %s", repair.failure())
    acted = repair.shards_rebuilt or repair.shards_deleted or repair.shards_reinstated
    if acted or repair.problems or repair.limited:
        log.info("repair: %s", "; ".join(repair.lines()))
