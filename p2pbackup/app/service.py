"""The service: each command on a home's repository, one method apiece.

Nouns:

* **service** — :class:`Service`, bound to one home. Each method takes a
  typed request (:mod:`p2pbackup.app.requests`) and a console, does the work
  and says how it ended. The command line calls it in its own process;
  ``serve`` calls it for a client of its control socket (:meth:`Service.answer`).
  Both ways run the same code with the same output and errors.
* **console** — :class:`Console`: where a command's lines go. ``out`` takes
  each line of output; ``progress``, when there is one, each progress line
  (an empty line ends it), and None means no progress is shown. In the
  command's own process they write to stdout and to stderr's terminal; in the
  daemon they send to the client, which shows them there.
* **outcome** — :class:`~p2pbackup.node.control.Outcome`: the exit code and
  the one line that says what went wrong. An expected failure raises a
  :class:`~p2pbackup.errors.P2PBackupError` (or an OSError); work that ends
  part done (a restore with files it could not write) returns its code and
  line, so that they reach whoever ran the command, never the daemon's stderr.

The heavy parts (the engine, the DHT) are imported when a command runs, so
that the command line starts quickly.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, assert_never

import attrs

from p2pbackup.app.home import Home
from p2pbackup.app.requests import (
    COMMANDS,
    BackupRequest,
    CheckRequest,
    DelegateAddRequest,
    DelegateListRequest,
    DelegateRemoveRequest,
    DiffRequest,
    DumpRequest,
    FindRequest,
    ForgetRequest,
    FriendAddRequest,
    FriendListRequest,
    FriendRemoveRequest,
    LeaveRequest,
    LsRequest,
    PeerAddDirRequest,
    PeerAddRequest,
    PeerFindRequest,
    PeerListRequest,
    PeerRemoveRequest,
    PeerRenameRequest,
    PruneRequest,
    RepairRequest,
    Request,
    RestoreRequest,
    SnapshotsRequest,
    StatsRequest,
    StatusRequest,
    TagRequest,
    decode_arguments,
)
from p2pbackup.engine.progress import Progress, human_bytes, plural
from p2pbackup.errors import P2PBackupError, UsageError
from p2pbackup.model import NodeKind, Snapshot, TreeNode
from p2pbackup.net.limits import BandwidthLimits
from p2pbackup.net.network import Network
from p2pbackup.node.control import EXIT_BAD_REQUEST, ControlRequest, LineSink, Outcome
from p2pbackup.nurseries import leaves, unwrap_single

if TYPE_CHECKING:
    from p2pbackup.app import operations
    from p2pbackup.engine import browse, retention, stats
    from p2pbackup.engine.prune import PruneSummary
    from p2pbackup.engine.repository import Repository
    from p2pbackup.maintenance.repairer import RepairOptions

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PARTIAL = 3

OK = Outcome(EXIT_OK)


@attrs.frozen
class Console:
    """Where a command's output and progress lines go (see the module docstring)."""

    out: LineSink
    progress: LineSink | None = None
    #: Where bytes go (``dump``): the command's own standard output; None
    #: where there is none (in the daemon).
    data: Callable[[bytes], None] | None = None

    def progress_line(self, label: str) -> Progress:
        """A progress line for ``label``: shown through ``progress``, or not at all."""
        return Progress(label, sink=self.progress, enabled=self.progress is not None)


#: The type letter ``ls -l`` shows for each kind of node.
_LS_TYPES = {
    NodeKind.FILE: "-",
    NodeKind.DIR: "d",
    NodeKind.SYMLINK: "l",
    NodeKind.FIFO: "p",
    NodeKind.CHARDEV: "c",
    NodeKind.BLOCKDEV: "b",
}


def error_message(exc: BaseException) -> str | None:
    """The one line a user sees for an expected failure (or a group of them,
    their lines joined); None for a bug."""
    if isinstance(exc, BaseExceptionGroup):
        messages = [error_message(leaf) for leaf in leaves(exc)]
        return "; ".join(m for m in messages if m) if all(messages) else None
    if isinstance(exc, P2PBackupError):
        return str(exc)
    if isinstance(exc, OSError):
        # Permissions, a full disk, a vanished directory: the user's to fix.
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return None


def _json(data: object) -> str:
    return json.dumps(data, indent=2)


@attrs.frozen
class Service:
    """The commands on one home's repository (see the module docstring)."""

    home: Home

    async def run(self, request: Request, console: Console) -> Outcome:
        """Run any request: the method its class names."""
        match request:
            case BackupRequest():
                return await self.backup(request, console)
            case RestoreRequest():
                return await self.restore(request, console)
            case SnapshotsRequest():
                return await self.snapshots(request, console)
            case TagRequest():
                return await self.tag(request, console)
            case StatsRequest():
                return await self.stats(request, console)
            case LsRequest():
                return await self.ls(request, console)
            case DiffRequest():
                return await self.diff(request, console)
            case FindRequest():
                return await self.find(request, console)
            case DumpRequest():
                return await self.dump(request, console)
            case ForgetRequest():
                return await self.forget(request, console)
            case PruneRequest():
                return await self.prune(request, console)
            case CheckRequest():
                return await self.check(request, console)
            case StatusRequest():
                return await self.status(request, console)
            case RepairRequest():
                return await self.repair(request, console)
            case LeaveRequest():
                return await self.leave(request, console)
            case PeerAddDirRequest():
                return await self.peer_add_dir(request, console)
            case PeerAddRequest():
                return await self.peer_add(request, console)
            case PeerRemoveRequest():
                return await self.peer_remove(request, console)
            case PeerListRequest():
                return await self.peer_list(request, console)
            case PeerRenameRequest():
                return await self.peer_rename(request, console)
            case PeerFindRequest():
                return await self.peer_find(request, console)
            case FriendAddRequest():
                return await self.friend_add(request, console)
            case FriendListRequest():
                return await self.friend_list(request, console)
            case FriendRemoveRequest():
                return await self.friend_remove(request, console)
            case DelegateAddRequest():
                return await self.delegate_add(request, console)
            case DelegateListRequest():
                return await self.delegate_list(request, console)
            case DelegateRemoveRequest():
                return await self.delegate_remove(request, console)
            case _:
                assert_never(request)

    async def answer(
        self,
        request: ControlRequest,
        out: LineSink,
        progress: LineSink | None,
        *,
        asker: str = "a client",
    ) -> Outcome:
        """Run a request that came over the control socket (its handler): any
        expected failure becomes the outcome the client shows. ``asker`` names
        who asked in the log line, so the dashboard's own reads are told apart
        from commands a user typed."""
        cls = COMMANDS.get(request.command)
        if cls is None:
            return Outcome(
                EXIT_BAD_REQUEST,
                f"the daemon does not run `{request.command}`; run it with P2PBACKUP_LOCAL=1",
            )
        try:
            typed = decode_arguments(cls, request.args)
        except P2PBackupError as problem:
            return Outcome(EXIT_BAD_REQUEST, str(problem))
        log.info("running `%s` for %s", request.command, asker)
        try:
            with unwrap_single():
                return await self.run(typed, Console(out, progress))
        except (P2PBackupError, OSError) as exc:
            message = error_message(exc)
            assert message is not None
            return Outcome(EXIT_ERROR, message)

    # -- backups and snapshots ----------------------------------------------------

    async def backup(self, request: BackupRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.core.exclude import ExcludeRules
        from p2pbackup.engine.backup import Backup

        exclude = ExcludeRules.from_patterns(
            [*request.exclude, *_listed(request.exclude_file, "--exclude-file")],
            if_present=request.exclude_if_present,
            one_file_system=request.one_file_system,
        )
        paths = [*request.paths, *_listed_paths(request.files_from)]
        if not paths:
            raise UsageError(f"nothing to back up: {', '.join(request.files_from)} list no path")
        # A dry run writes nothing: it may run beside a backup.
        access: operations.Access = "read" if request.dry_run else "write"
        async with operations.open_repository(
            self.home, access=access, network=_network(request)
        ) as repo:
            repo.takeover = request.takeover
            summary = await Backup(
                repo,
                progress=None if request.quiet else console.progress_line("backup"),
                exclude=exclude,
                dry_run=request.dry_run,
                skip_if_unchanged=request.skip_if_unchanged,
                told=(
                    (lambda kind, path: console.out(f"{kind:<8} {os.fsdecode(path)}"))
                    if request.verbose
                    else None
                ),
            ).run(paths, request.tags)
            # A run that stored nothing changes no pack: no new grant.
            stored = not request.dry_run and summary.unchanged_since is None
            warnings = await _hand_grants(repo) if stored else []
        if request.json:
            console.out(_json(summary.to_json()))
        elif request.quiet:
            if summary.snapshot_id:
                console.out(summary.snapshot_id.hex())
        else:
            for line in summary.lines():
                console.out(line)
            for warning in warnings:
                console.out(warning)
            if summary.unchanged_since is not None:
                console.out(unchanged_line(summary.unchanged_since))
            elif summary.dry_run:
                console.out("--dry-run: nothing was stored")
            else:
                console.out("snapshot saved:")
                console.out(summary.snapshot_id.hex())
        if summary.below_n:
            # Saved and restorable, but less safe than its code says: a
            # script (or cron) must hear of it, not only a reader of the log.
            return Outcome(
                EXIT_PARTIAL,
                f"snapshot {summary.snapshot_id.hex()[:12]} saved, but "
                f"{plural(len(summary.below_n), 'pack')} "
                f"{'is' if len(summary.below_n) == 1 else 'are'} stored below "
                f"{'its' if len(summary.below_n) == 1 else 'their'} n (see the warnings)",
            )
        return OK

    async def snapshots(self, request: SnapshotsRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.engine.snapshots import SnapshotFilter

        chosen = SnapshotFilter.from_options(tag=request.tag, path=request.path, host=request.host)
        async with operations.open_repository(self.home, access="read") as repo:
            every = repo.index.snapshots()
        rows = chosen.select(every)
        if request.json:
            console.out(
                _json(
                    [
                        {
                            "id": sid.hex(),
                            "time": time.strftime(
                                "%Y-%m-%dT%H:%M:%S%z", time.localtime(s.time_ns / 1e9)
                            ),
                            "time_ns": s.time_ns,
                            "hostname": s.hostname,
                            "paths": [os.fsdecode(p) for p in s.paths],
                            "tags": list(s.tags),
                            "files": s.file_count,
                            "size": s.total_size,
                        }
                        for sid, s in rows
                    ]
                )
            )
            return OK
        if not rows:
            console.out("no snapshot matches" if every else "no snapshots yet")
        for sid, s in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.time_ns / 1e9))
            paths = ", ".join(os.fsdecode(p) for p in s.paths)
            tags = f"  [{', '.join(s.tags)}]" if s.tags else ""
            console.out(
                f"{sid.hex()[:12]}  {when}  {s.hostname}  {plural(s.file_count, 'file')}  "
                f"{human_bytes(s.total_size)}  {paths}{tags}"
            )
        return OK

    async def tag(self, request: TagRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.engine import snapshots

        async with operations.open_repository(self.home, access="remove") as repo:
            results = await snapshots.retag(
                repo,
                request.snapshots,
                add=snapshots.tag_list(request.add),
                remove=snapshots.tag_list(request.remove),
                replace=None if request.set is None else snapshots.tag_list(request.set),
            )
        if request.json:
            console.out(
                _json(
                    [
                        {
                            "old": r.old_id.hex(),
                            "new": r.new_id.hex(),
                            "tags": list(r.tags),
                            "changed": r.changed,
                        }
                        for r in results
                    ]
                )
            )
            return OK
        for r in results:
            tags = ", ".join(r.tags) or "(none)"
            if r.changed:
                console.out(
                    f"snapshot {r.old_id.hex()[:12]} is now {r.new_id.hex()[:12]}, tags: {tags}"
                )
            else:
                console.out(f"snapshot {r.old_id.hex()[:12]} unchanged, tags: {tags}")
        changed = sum(r.changed for r in results)
        console.out(f"{plural(changed, 'snapshot')} changed")
        return OK

    async def stats(self, request: StatsRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.engine import snapshots, stats

        stats.check_mode(request.mode)
        chosen = snapshots.SnapshotFilter.from_options(
            tag=request.tag, path=request.path, host=request.host
        )
        async with operations.open_repository(self.home, access="read") as repo:
            if request.snapshots:
                named = dict(snapshots.resolve(repo.index, ref) for ref in request.snapshots)
                rows = sorted(named.items(), key=lambda row: (row[1].time_ns, row[0]))
            else:
                rows = repo.index.snapshots()
            if not rows:
                raise UsageError("there are no snapshots yet")
            rows = chosen.select(rows)
            if not rows:
                raise UsageError("no snapshot matches the filters")
            found = await stats.snapshot_stats(
                repo, rows, mode=request.mode, by_peer=request.by_peer
            )
        if request.json:
            console.out(_json(found.to_json()))
            return OK
        for line in _stats_lines(found):
            console.out(line)
        return OK

    async def ls(self, request: LsRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.engine import snapshots

        async with operations.open_repository(self.home, access="read") as repo:
            _sid, snap = snapshots.resolve(repo.index, request.snapshot)
            entries = []
            async for path, node in snapshots.walk(repo, snap, os.fsencode(request.path or "/")):
                entries.append((path, node))
        if request.json:
            console.out(_json([_ls_json(p, n) for p, n in entries]))
        else:
            for path, node in entries:
                console.out(_describe(path, node))
        return OK

    async def diff(self, request: DiffRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.engine import browse, snapshots

        stats = browse.DiffStats()
        changes = []
        async with operations.open_repository(self.home, access="read") as repo:
            old_id, old = snapshots.resolve(repo.index, request.snapshot1)
            new_id, new = snapshots.resolve(repo.index, request.snapshot2)
            async for change in browse.diff(repo, old, new):
                stats.count(change)
                changes.append(change)
        if request.json:
            console.out(
                _json(
                    {
                        "old": old_id.hex(),
                        "new": new_id.hex(),
                        "changes": [_change_json(c) for c in changes],
                        "stats": attrs.asdict(stats),
                    }
                )
            )
            return OK
        console.out(f"comparing snapshot {old_id.hex()[:12]} to {new_id.hex()[:12]}:")
        for change in changes:
            console.out(_change_line(change))
        console.out("")
        for line in _diff_stats_lines(stats):
            console.out(line)
        return OK

    async def find(self, request: FindRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.engine import browse, snapshots

        rules = browse.matcher(list(request.patterns))
        found: list[tuple[bytes, Snapshot, list[tuple[bytes, TreeNode]]]] = []
        async with operations.open_repository(self.home, access="read") as repo:
            if request.snapshot:
                chosen = dict(snapshots.resolve(repo.index, ref) for ref in request.snapshot)
                rows = sorted(chosen.items(), key=lambda item: item[1].time_ns)
            else:
                rows = repo.index.snapshots()
            for sid, snap in rows:
                matches = [item async for item in browse.find(repo, snap, rules)]
                if matches:
                    found.append((sid, snap, matches))
        if request.json:
            console.out(
                _json(
                    [
                        {
                            "snapshot": sid.hex(),
                            "time": time.strftime(
                                "%Y-%m-%dT%H:%M:%S%z", time.localtime(snap.time_ns / 1e9)
                            ),
                            "matches": [_ls_json(p, n) for p, n in matches],
                        }
                        for sid, snap, matches in found
                    ]
                )
            )
            return OK
        if not found:
            searched = plural(len(rows), "snapshot")
            console.out(f"nothing matches {' or '.join(request.patterns)} in {searched}")
        for sid, snap, matches in found:
            console.out(f"found in snapshot {sid.hex()[:12]} from {_when(snap.time_ns)}:")
            for path, node in matches:
                console.out(f"  {_describe(path, node)}")
        return OK

    async def dump(self, request: DumpRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.engine import browse, snapshots

        if console.data is None:
            raise UsageError("dump writes bytes to its own standard output: run it there")
        async with operations.open_repository(self.home, access="read") as repo:
            _sid, snap = snapshots.resolve(repo.index, request.snapshot)
            await browse.dump(repo, snap, os.fsencode(request.path), console.data)
        return OK

    async def restore(self, request: RestoreRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.core.exclude import ExcludeRules
        from p2pbackup.engine import snapshots
        from p2pbackup.engine.restore import Restorer

        async with operations.open_repository(
            self.home, access="read", network=_network(request)
        ) as repo:
            sid, snap = snapshots.resolve(repo.index, request.snapshot)
            only = os.fsencode(request.path) if request.path else None
            restorer = Restorer(
                repo,
                Path(request.target),
                overwrite=request.overwrite,
                progress=console.progress_line("restore"),
                include=ExcludeRules.from_patterns(request.include),
                exclude=ExcludeRules.from_patterns(request.exclude),
                verify=request.verify,
            )
            summary = await restorer.run(snap, only)
        if request.json:
            console.out(_json(summary.to_json()))
        else:
            console.out(f"snapshot {sid.hex()[:12]} → {restorer.target}")
            for line in summary.lines():
                console.out(line)
        if not summary.ok:
            return Outcome(EXIT_PARTIAL, "the restore is incomplete (see the list above)")
        return OK

    async def forget(self, request: ForgetRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.engine import retention, snapshots
        from p2pbackup.engine.prune import prune

        async with operations.open_repository(self.home, access="remove") as repo:
            if request.snapshots:
                chosen = [
                    snapshots.resolve(repo.index, ref)[0]
                    for ref in dict.fromkeys(request.snapshots)
                ]
                decision = None
                if not request.dry_run:
                    await snapshots.forget_ids(repo, list(dict.fromkeys(chosen)))
            else:
                decision = await snapshots.apply_retention(
                    repo,
                    _policy(request),
                    tz=local_zone(),
                    group_by=retention.parse_group_by(request.group_by),
                    dry_run=request.dry_run,
                )
                chosen = decision.removed
            pruned = None
            if request.prune and chosen:
                pruned = await prune(
                    repo,
                    progress=console.progress_line("prune"),
                    dry_run=request.dry_run,
                    without=frozenset(chosen) if request.dry_run else frozenset(),
                )
        if request.json:
            console.out(_json(_forget_json(request, chosen, decision, pruned)))
            return OK
        if decision is not None:
            for line in _decision_lines(decision):
                console.out(line)
        forgot = "would forget" if request.dry_run else "forgot"
        if not chosen:
            console.out("no snapshot to forget: the policy keeps them all")
            if request.prune:
                # As restic: prune only after a forget; but say so, or
                # --prune looks ignored.
                console.out("so --prune did not run (`p2pbackup prune` runs it on its own)")
        elif decision is None:
            for sid in dict.fromkeys(chosen):
                console.out(f"{forgot} snapshot {sid.hex()[:12]}")
        else:
            console.out(f"{forgot} {plural(len(chosen), 'snapshot')}")
        if request.dry_run:
            console.out("--dry-run: nothing was changed")
        if pruned is not None:
            for line in pruned.lines():
                console.out(line)
        elif chosen and not request.dry_run:
            only = "it" if len(set(chosen)) == 1 else "they"
            console.out(f"run `p2pbackup prune` to free the space only {only} used")
        return OK

    async def prune(self, request: PruneRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.engine.prune import prune

        async with operations.open_repository(self.home, access="remove") as repo:
            summary = await prune(
                repo, progress=console.progress_line("prune"), dry_run=request.dry_run
            )
            warnings = [] if request.dry_run else await _hand_grants(repo)
        if request.json:
            console.out(_json(attrs.asdict(summary)))
        else:
            for line in [*summary.lines(), *warnings]:
                console.out(line)
        return OK

    async def check(self, request: CheckRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.engine.check import check

        async with operations.open_repository(
            self.home, access="read", network=_network(request)
        ) as repo:
            summary = await check(
                repo, read_data=request.read_data, progress=console.progress_line("check")
            )
        if request.json:
            console.out(_json(summary.to_json()))
        else:
            for line in summary.lines():
                console.out(line)
        # The summary's lines say what is wrong.
        return OK if summary.ok else Outcome(EXIT_PARTIAL)

    async def status(self, request: StatusRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.maintenance import status
        from p2pbackup.node.relay import RUNNING_RELAY

        async with operations.open_repository(self.home, access="read") as repo:
            report = await status.gather_status(repo, operations.hosting(self.home))
            snapshots = repo.index.snapshots()
        newest = max((snap.time_ns for _, snap in snapshots), default=None)
        backups = _backups(None if newest is None else newest // 1_000_000_000)
        reachability = _reachability_line()
        relay = RUNNING_RELAY.get()
        relaying = None if relay is None else relay.report()
        if request.json:
            data = report.to_json()
            if reachability is not None:
                data["reachability"] = reachability
            if relaying is not None:
                data["relay"] = relaying.to_json()
            data["backups"] = backups[1]
            console.out(_json(data))
        else:
            for line in report.lines():
                console.out(line)
            for line in backups[0]:
                console.out(line)
            if reachability is not None:
                console.out(reachability)
            if relaying is not None:
                console.out(relaying.line())
        return OK

    async def repair(self, request: RepairRequest, console: Console) -> Outcome:
        """A repair pass now: every placed shard audited, then every listed
        shard read back and verified (which also finds damage an audit's
        sample of blocks missed), then every pack below r rebuilt."""
        from p2pbackup.app import operations
        from p2pbackup.maintenance import auditor, grants, repairer
        from p2pbackup.maintenance.repair import RepairPolicy
        from p2pbackup.node.schedule import parse_duration, parse_size

        policy = RepairPolicy()
        if request.grace is not None:
            policy = attrs.evolve(policy, grace=parse_duration(request.grace))
        rate: float | None = repairer.DEFAULT_RATE
        if request.rate is not None:
            rate = None if request.rate == "unlimited" else float(parse_size(request.rate))
        options = repairer.RepairOptions(policy=policy, rate=rate, verify=True)
        if request.owner is not None:
            return await self._repair_for(request, options, console)
        async with operations.open_repository(self.home) as repo:
            # Where delegates moved shards while this home was away, first.
            taken, warnings = await grants.read_back(repo)
            audit = await auditor.audit_once(repo)
            report = await repairer.repair_pass(
                repo,
                repairer.with_audits(options, repo.index),
                progress=console.progress_line("repair"),
            )
            warnings += await _hand_grants(repo)
        if request.json:
            console.out(
                _json({**report.to_json(), "audit": audit.to_json(), "delegated_moves": taken})
            )
        else:
            if taken:
                console.out(f"took {taken} shard locations from the delegates' repair logs")
            for line in audit.lines():
                console.out(f"audit: {line}")
            for line in report.lines():
                if line != report.failure():
                    console.out(line)
            for warning in warnings:
                console.out(warning)
        if not report.ok:
            return Outcome(EXIT_ERROR, report.failure())
        return OK

    async def _repair_for(
        self, request: RepairRequest, options: RepairOptions, console: Console
    ) -> Outcome:
        """``repair --for OWNER``: a pass over another home's packs, from the
        grant it handed this node as its delegate (maintenance.delegated)."""
        from p2pbackup.app import delegating, operations

        assert request.owner is not None
        owner = operations.parse_node_id(request.owner)
        self.home.require()
        grant, result = await delegating.repair_for_owner(
            self.home, owner, options, progress=console.progress_line("repair")
        )
        report = result.repair
        if request.json:
            console.out(
                _json(
                    {
                        **report.to_json(),
                        "audit": result.audit.to_json(),
                        "owner": owner.hex(),
                        "grant_sequence": grant.sequence,
                        "leases_renewed": result.leases.renewed,
                        "leases_missing": result.leases.missing,
                    }
                )
            )
        else:
            console.out(f"repairing for node {owner.hex()}, from its grant {grant.sequence}")
            for line in result.audit.lines():
                console.out(f"audit: {line}")
            for line in report.lines():
                if line != report.failure():
                    console.out(line)
            for line in result.leases.lines():
                console.out(f"leases: {line}")
        if not report.ok:
            return Outcome(EXIT_ERROR, report.failure())
        return OK

    # -- leaving the network -------------------------------------------------------

    async def leave(self, request: LeaveRequest, console: Console) -> Outcome:
        """Delete our data on every peer, and tell the owners we store for
        that we are going (:mod:`p2pbackup.app.leave`)."""
        from p2pbackup.app import leave, operations

        async with operations.open_repository(self.home, access="remove") as repo:
            report = await leave.leave(self.home, repo)
        if request.json:
            console.out(_json(report.to_json()))
        else:
            for line in report.lines():
                console.out(line)
        return OK if report.ok else Outcome(EXIT_PARTIAL, report.failure())

    # -- peers and friends --------------------------------------------------------

    async def peer_add_dir(self, request: PeerAddDirRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations

        async with operations.open_repository(self.home) as repo:
            record = await operations.add_folder_peer(repo, Path(request.path))
            console.out(f"added peer {record.peer_id} at {record.location}")
        return OK

    async def peer_add(self, request: PeerAddRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations

        async with operations.open_repository(self.home) as repo:
            record = await operations.add_node_peer(repo, request.address, request.node_id)
            console.out(f"added peer {record.peer_id} at {record.location}")
        return OK

    async def peer_remove(self, request: PeerRemoveRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations

        async with operations.open_repository(self.home, access="remove") as repo:
            removed = await operations.remove_peer(repo, request.id, force=request.force)
        _removal_lines(console, f"removed peer {removed.peer_id}", removed)
        return OK

    async def peer_list(self, request: PeerListRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations

        async with operations.open_repository(self.home, access="read") as repo:
            counts = repo.index.shard_count_by_peer()
            peers = repo.peers()
            names = repo.index.peer_names()
        if request.json:
            console.out(
                _json(
                    [
                        {
                            "peer_id": p.peer_id,
                            "name": names.get(p.peer_id),
                            "kind": p.kind,
                            "location": p.location,
                            "shards": counts.get(p.peer_id, 0),
                        }
                        for p in peers
                    ]
                )
            )
            return OK
        for p in peers:
            console.out(
                f"{p.peer_id}{_name_of(names, p.peer_id)}  {p.kind}  {p.location}  "
                f"{plural(counts.get(p.peer_id, 0), 'shard')}"
            )
        if not peers:
            console.out("no peers yet: add one with `p2pbackup peer add` or `peer add-dir`")
        return OK

    async def peer_find(self, request: PeerFindRequest, console: Console) -> Outcome:
        from p2pbackup.app import homedht, operations
        from p2pbackup.dht import discovery
        from p2pbackup.net.network import Address

        bootstrap = [Address.parse(text, allow_port_zero=False) for text in request.bootstrap]
        self.home.require()
        remembered = homedht.remembered(self.home)
        assert remembered is not None  # home.require() passed
        found = await discovery.find_storage_nodes(
            remembered,
            count=request.count,
            bootstrap=bootstrap,
            friends=homedht.home_friends(self.home),
        )
        if not found:
            raise UsageError("no node in the DHT offers storage to strangers (open mode) right now")
        added: list[str] = []
        if request.add:
            async with operations.open_repository(self.home) as repo:
                known = {p.peer_id for p in repo.peers()}
                for record in found:
                    if record.node_id.hex() in known:
                        continue
                    address = record.addresses[0]
                    try:
                        await operations.add_node_peer(
                            repo, str(Address(address.host, address.port)), record.node_id.hex()
                        )
                    except P2PBackupError as error:
                        console.out(f"warning: node {record.node_id.hex()} not added: {error}")
                    else:
                        added.append(record.node_id.hex())
        if request.json:
            console.out(
                _json(
                    [
                        {
                            "node_id": r.node_id.hex(),
                            "addresses": [str(Address(a.host, a.port)) for a in r.addresses],
                            "storage_offered": r.storage_offered,
                            "added": r.node_id.hex() in added,
                        }
                        for r in found
                    ]
                )
            )
            return OK
        for record in found:
            where = ", ".join(str(Address(a.host, a.port)) for a in record.addresses)
            mark = " (added as a peer)" if record.node_id.hex() in added else ""
            console.out(
                f"node {record.node_id.hex()} at {where} offers "
                f"{human_bytes(record.storage_offered)}{mark}"
            )
        if not request.add:
            console.out(
                "these are strangers; `p2pbackup peer find --add` makes them peers (open mode)"
            )
        return OK

    async def peer_rename(self, request: PeerRenameRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations

        async with operations.open_repository(self.home) as repo:
            peer = operations.find_peer(repo, request.id)
            operations.name_peer(repo, peer.peer_id, request.name or None)
            name = repo.index.peer_names().get(peer.peer_id)
        console.out(
            f"peer {peer.peer_id} is now named {name}"
            if name
            else f"peer {peer.peer_id} has no name now"
        )
        return OK

    async def friend_add(self, request: FriendAddRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations

        async with operations.open_repository(self.home) as repo:
            if request.name is not None:
                operations.check_name(request.name)  # before anything is added
            added = await operations.add_friend(repo, request.code)
            if request.name is not None:
                operations.name_peer(repo, added.friend.node_id.hex(), request.name)
        for warning in added.warnings:
            console.out(f"warning: {warning}")
        where = "reached at" if added.reached else "to be reached at"
        console.out(f"added friend {added.friend.node_id.hex()}, {where} {added.peer.location}")
        return OK

    async def friend_list(self, request: FriendListRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations

        async with operations.open_repository(self.home, access="read") as repo:
            listed = operations.friends(repo)
            names = repo.index.peer_names()
        if request.json:
            console.out(
                _json(
                    [
                        {
                            "node_id": s.friend.node_id.hex(),
                            "name": names.get(s.friend.node_id.hex()),
                            "addresses": list(s.friend.addresses),
                            "location": s.location,
                            "shards": s.shards,
                            "added_at": s.friend.added_at,
                        }
                        for s in listed
                    ]
                )
            )
            return OK
        for s in listed:
            console.out(
                f"{s.friend.node_id.hex()}{_name_of(names, s.friend.node_id.hex())}  "
                f"{', '.join(s.friend.addresses)}  "
                f"{plural(s.shards, 'shard')}"
            )
        if not listed:
            console.out(
                "no friends yet: add one with `p2pbackup friend add CODE` (`invite` prints yours)"
            )
        return OK

    async def friend_remove(self, request: FriendRemoveRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations

        async with operations.open_repository(self.home, access="remove") as repo:
            removed = await operations.remove_friend(repo, request.id, force=request.force)
        _removal_lines(console, f"removed friend {removed.friend.node_id.hex()}", removed)
        return OK

    # -- delegates ----------------------------------------------------------------

    async def delegate_add(self, request: DelegateAddRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.maintenance import grants
        from p2pbackup.model import PEER_KIND_NODE

        async with operations.open_repository(self.home) as repo:
            peer = operations.find_peer(repo, request.id)
            if peer.kind != PEER_KIND_NODE:
                raise UsageError(
                    f"peer {peer.peer_id} is a folder; a delegate is a node on the network "
                    "(a friend, or a peer added with `peer add`)"
                )
            node_id = bytes.fromhex(peer.peer_id)
            with repo.index.transaction():
                if not repo.index.add_delegate(node_id, int(time.time())):
                    raise UsageError(
                        f"node {peer.peer_id} is a delegate already (see `delegate list`)"
                    )
            # Where it moved shards, if it kept this home alive before (a home
            # recovered from its key adds its delegates again): first.
            taken, _warnings = await grants.read_back(repo)
            handed = {h.node_id: h for h in await grants.hand_grants(repo)}
            # A home recovered from its key gets its delegates back from there.
            published = await operations.publish_root_or_warn(repo)
        mine = handed[node_id]
        console.out(f"added delegate {peer.peer_id}")
        if taken:
            console.out(f"took {taken} shard locations from its repair log")
        if mine.ok:
            console.out(f"it holds the repair grant of sequence {mine.sequence}")
        else:
            console.out(
                f"warning: it was not handed the repair grant now ({mine.problem}); "
                "it is handed again after each backup, prune and repair"
            )
        for warning in published:
            console.out(f"warning: {warning}")
        return OK

    async def delegate_list(self, request: DelegateListRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations

        async with operations.open_repository(self.home, access="read") as repo:
            rows = repo.index.delegates()
            locations = {p.peer_id: p.location for p in repo.peers()}
        if request.json:
            console.out(
                _json(
                    [
                        {
                            "node_id": row.node_id.hex(),
                            "location": locations.get(row.node_id.hex()),
                            "added_at": row.added_at,
                            "granted_at": row.granted_at,
                            "grant_sequence": row.grant_sequence,
                            "problem": row.problem,
                        }
                        for row in rows
                    ]
                )
            )
            return OK
        for row in rows:
            if row.granted_at is None:
                held = "holds no grant yet"
            else:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.granted_at))
                held = f"grant {row.grant_sequence} taken {when}"
            problem = f"  (last hand-over failed: {row.problem})" if row.problem else ""
            location = locations.get(row.node_id.hex()) or "no longer a peer"
            console.out(f"{row.node_id.hex()}  {location}  {held}{problem}")
        if not rows:
            console.out(
                "no delegates yet: `p2pbackup delegate add NODE_ID` lets a friend keep "
                "this home's backups alive while it is away"
            )
        return OK

    async def delegate_remove(self, request: DelegateRemoveRequest, console: Console) -> Outcome:
        from p2pbackup.app import operations
        from p2pbackup.maintenance import grants

        async with operations.open_repository(self.home) as repo:
            rows = {row.node_id.hex(): row for row in repo.index.delegates()}
            wanted = request.id.strip().lower()
            matches = [name for name in rows if name.startswith(wanted)] if wanted else []
            if len(matches) != 1:
                problem = "no delegate" if not matches else f"{len(matches)} delegates"
                raise UsageError(
                    f"{problem} with a node id starting with {wanted!r} (see `delegate list`)"
                )
            node_id = rows[matches[0]].node_id
            told, warnings = await grants.revoke(repo, node_id)
            with repo.index.transaction():
                repo.index.remove_delegate(node_id)
            warnings += await operations.publish_root_or_warn(repo)
        for warning in warnings:
            console.out(f"warning: {warning}")
        console.out(f"removed delegate {node_id.hex()}; {told} nodes refuse its certificates now")
        return OK


async def _hand_grants(repo: Repository) -> list[str]:
    """Hand every delegate the repair grant after a run that changed shard
    maps; a warning line for each that could not take it."""
    from p2pbackup.maintenance import grants

    return await grants.hand_out(repo)


def _stats_lines(found: stats.SnapshotStats) -> list[str]:
    count = len(found.snapshot_ids)
    which = (
        f"snapshot {found.snapshot_ids[0].hex()[:12]}" if count == 1 else plural(count, "snapshot")
    )
    lines = [f"stats in {found.mode} mode for {which}:"]
    raw = found.raw
    if raw is None:
        lines += [
            f"  files:              {found.total_file_count}",
            f"  total size:         {human_bytes(found.total_size)}",
        ]
    else:
        lines += [
            f"  blobs:              {raw.blobs}",
            f"  uncompressed size:  {human_bytes(raw.uncompressed_size)}",
            f"  stored size:        {human_bytes(raw.size)} "
            f"(compression ratio {raw.compression_ratio:.2f}x)",
            f"  with redundancy:    {human_bytes(raw.stored_with_redundancy)} "
            f"in {plural(raw.packs, 'pack')}",
        ]
    if found.holdings is not None:
        lines.append("peers holding their packs:")
        for h in found.holdings:
            lines.append(
                f"  {h.peer_id}  {h.location}  {plural(h.shards, 'shard')}  {human_bytes(h.bytes)}"
            )
        if not found.holdings:
            lines.append("  none")
    for problem in found.problems:
        lines.append(f"warning: {problem}")
    return lines


def _listed(files: tuple[str, ...], option: str) -> list[str]:
    """The entries of the pattern files ``files`` (``option`` names them in errors)."""
    from p2pbackup.core.exclude import list_lines

    entries = []
    for name in files:
        try:
            with open(name, encoding="utf-8", errors="surrogateescape") as file:
                entries += list_lines(file.read())
        except OSError as exc:
            raise UsageError(f"{option} {name}: {exc.strerror or exc}") from exc
    return entries


def _listed_paths(files: tuple[str, ...]) -> list[str]:
    """The paths ``--files-from`` files list: absolute, as the daemon that
    may read them does not know where the command was typed."""
    paths = _listed(files, "--files-from")
    for path in paths:
        if not os.path.isabs(path):
            raise UsageError(
                f"--files-from lists {path!r}, which is not an absolute path "
                '(list absolute paths: find "$PWD" … writes them)'
            )
    return paths


def unchanged_line(parent: bytes) -> str:
    """What a backup that made no snapshot, as nothing changed, says."""
    return f"nothing changed since snapshot {parent.hex()[:12]}; no new snapshot"


def _removal_lines(console: Console, what: str, removed: operations.PeerRemoved) -> None:
    """What ``friend remove`` and ``peer remove`` say they did."""
    for warning in removed.warnings:
        console.out(f"warning: {warning}")
    console.out(what)
    if removed.shards_rebuilt:
        console.out(f"rebuilt {removed.shards_rebuilt} of its shards on other peers")
    if removed.shards_deleted:
        console.out(f"asked it to delete {plural(removed.shards_deleted, 'shard')}")
    if removed.shards_forgotten:
        console.out(f"forgot {plural(removed.shards_forgotten, 'shard')} it held")
    shortfall = removed.shortfall
    if shortfall.below_n:
        have = "now has" if shortfall.below_n == 1 else "now have"
        console.out(
            f"{plural(shortfall.below_n, 'pack')} {have} fewer than N shards (less redundant)"
        )
    if shortfall.below_k:
        console.out(
            f"{plural(shortfall.below_k, 'pack')} {'has' if shortfall.below_k == 1 else 'have'} "
            "fewer than K shards left: they cannot be restored"
        )


def _change_line(change: browse.Change) -> str:
    path = os.fsdecode(change.path)
    old, new = change.old, change.new
    if change.kind == "M" and old is not None and new is not None:
        return f"M    {path}  ({human_bytes(old.size)} → {human_bytes(new.size)})"
    node = new if new is not None else old
    assert node is not None
    suffix = "/" if node.kind == NodeKind.DIR else ""
    size = (
        f"  ({human_bytes(node.size)})"
        if node.kind == NodeKind.FILE and change.kind in "+-"
        else ""
    )
    return f"{change.kind}    {path}{suffix}{size}"


def _change_json(change: browse.Change) -> dict[str, object]:
    data: dict[str, object] = {
        "change": {"+": "added", "-": "removed", "M": "modified", "U": "metadata", "T": "type"}[
            change.kind
        ],
        "path": change.path.decode("utf-8", "backslashreplace"),
    }
    if change.old is not None:
        data["old"] = {"type": change.old.kind.name.lower(), "size": change.old.size}
    if change.new is not None:
        data["new"] = {"type": change.new.kind.name.lower(), "size": change.new.size}
    return data


def _diff_stats_lines(stats: browse.DiffStats) -> list[str]:
    return [
        f"added:    {plural(stats.files_added, 'file')}, "
        f"{plural(stats.dirs_added, 'directory')}, {plural(stats.others_added, 'other')}; "
        f"{human_bytes(stats.bytes_added)}",
        f"removed:  {plural(stats.files_removed, 'file')}, "
        f"{plural(stats.dirs_removed, 'directory')}, {plural(stats.others_removed, 'other')}; "
        f"{human_bytes(stats.bytes_removed)}",
        f"changed:  {plural(stats.files_changed, 'file')} "
        f"({human_bytes(stats.bytes_changed_before)} → {human_bytes(stats.bytes_changed_after)}); "
        f"metadata only: {stats.metadata_changed}",
    ]


def _when(time_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time_ns / 1e9))


def _policy(request: ForgetRequest) -> retention.RetentionPolicy:
    from p2pbackup.engine import retention

    return retention.RetentionPolicy.from_options(
        keep_last=request.keep_last,
        keep_hourly=request.keep_hourly,
        keep_daily=request.keep_daily,
        keep_weekly=request.keep_weekly,
        keep_monthly=request.keep_monthly,
        keep_yearly=request.keep_yearly,
        keep_within=request.keep_within,
        keep_tag=request.keep_tag,
    )


def local_zone() -> datetime.tzinfo:
    """The user's time zone: a policy's days and weeks are theirs."""
    zone = datetime.datetime.now().astimezone().tzinfo
    assert zone is not None
    return zone


def _group_title(key: Mapping[str, object]) -> str:
    parts = []
    for name, value in key.items():
        if name == "paths":
            assert isinstance(value, tuple)
            parts.append(f"paths {', '.join(os.fsdecode(p) for p in value) or '(none)'}")
        elif name == "tags":
            assert isinstance(value, tuple)
            parts.append(f"tags {', '.join(value) or '(none)'}")
        else:
            parts.append(f"host {value}")
    return "snapshots of " + "; ".join(parts) if parts else "all snapshots"


def _decision_lines(decision: retention.RetentionDecision) -> list[str]:
    """restic's forget listing: per group, what is kept and why, what goes."""
    lines = []
    for group in decision.groups:
        lines.append(f"{_group_title(group.key)}:")
        lines.append(f"keep {plural(len(group.keep), 'snapshot')}:")
        for kept in group.keep:
            lines.append(
                f"  {kept.snapshot_id.hex()[:12]}  {_when(kept.snapshot.time_ns)}  "
                f"{', '.join(kept.reasons)}"
            )
        if group.remove:
            lines.append(f"remove {plural(len(group.remove), 'snapshot')}:")
            for sid, snap in group.remove:
                lines.append(f"  {sid.hex()[:12]}  {_when(snap.time_ns)}")
        lines.append("")
    return lines


def _forget_json(
    request: ForgetRequest,
    chosen: list[bytes],
    decision: retention.RetentionDecision | None,
    pruned: PruneSummary | None,
) -> dict[str, object]:
    data: dict[str, object] = {
        "dry_run": request.dry_run,
        "forgotten": [sid.hex() for sid in dict.fromkeys(chosen)],
    }
    if decision is not None:
        data["groups"] = [
            {
                "key": {
                    name: [os.fsdecode(v) if isinstance(v, bytes) else v for v in value]
                    if isinstance(value, tuple)
                    else value
                    for name, value in group.key.items()
                },
                "keep": [
                    {"id": k.snapshot_id.hex(), "reasons": list(k.reasons)} for k in group.keep
                ],
                "remove": [sid.hex() for sid, _ in group.remove],
            }
            for group in decision.groups
        ]
    if pruned is not None:
        data["prune"] = attrs.asdict(pruned)
    return data


def _describe(path: bytes, node: TreeNode) -> str:
    kind = _LS_TYPES[node.kind]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(node.mtime_ns / 1e9))
    line = f"{kind}{stat.filemode(node.mode)[1:]}  {node.size:>12}  {when}  {os.fsdecode(path)}"
    if node.link_target is not None:
        line += f" -> {os.fsdecode(node.link_target)}"
    return line


def _ls_json(path: bytes, node: TreeNode) -> dict[str, object]:
    entry: dict[str, object] = {
        # Valid text for any JSON reader; a name that is not UTF-8 shows its
        # odd bytes as \xNN here and comes whole, in hex, as path_hex.
        "path": path.decode("utf-8", "backslashreplace"),
        "type": node.kind.name.lower(),
        "mode": node.mode,
        "size": node.size,
        "mtime_ns": node.mtime_ns,
    }
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        entry["path_hex"] = path.hex()
    return entry


def _backups(last_snapshot: int | None) -> tuple[list[str], dict[str, object]]:
    """What ``status`` says of backups: the newest snapshot, and under
    ``serve`` its schedule — the next run, and the last failure with its
    reason while no run has succeeded since (lines, and the JSON object)."""
    from p2pbackup.node.schedule import RUNNING_BACKUPS

    record = RUNNING_BACKUPS.get()
    when = "none yet" if last_snapshot is None else _local_time(last_snapshot)
    lines = [f"last backup: {when}"]
    data: dict[str, object] = {"last_snapshot": last_snapshot, "scheduled": None}
    if record is not None and record.interval is not None:
        data["scheduled"] = attrs.asdict(record)
        if record.next_at is not None:
            lines.append(f"next scheduled backup: {_local_time(int(record.next_at))}")
        if record.failing():
            assert record.last_failed is not None
            lines.append(
                f"last scheduled backup FAILED at {_local_time(int(record.last_failed))}: "
                f"{record.last_error}"
            )
    elif record is not None:
        lines.append("no scheduled backups (config.toml has no [backup] table)")
    return lines, data


def _name_of(names: Mapping[str, str], peer_id: str) -> str:
    """`` (alice)`` after a peer's id, for a peer the user named."""
    name = names.get(peer_id)
    return f" ({name})" if name else ""


def _local_time(unix: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(unix))


def _reachability_line() -> str | None:
    """How the world reaches the node running this command (None outside
    ``serve``): app.homenat's board."""
    from p2pbackup.node.reachability import REACHABILITY

    board = REACHABILITY.get()
    return None if board is None else board.line()


def _network(request: BackupRequest | RestoreRequest | CheckRequest) -> Network | None:
    """The network a command with bandwidth limits uses; None (the default
    network) without any."""
    limits = BandwidthLimits.from_kib(request.limit_upload, request.limit_download)
    if limits.unlimited:
        return None
    from p2pbackup.app import operations

    return operations.network_within(limits)
