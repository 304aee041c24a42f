"""The ``p2pbackup`` command line.

Every command prints what it did in plain lines (``--json`` where scripts read
the output). Expected failures — a bad path, a typo in a recovery key, too few
shards — print one ``p2pbackup: error: …`` line and exit 1; a traceback means
a bug. Secrets never appear on the command line: recovery keys are read from a
file (``--recovery-key-file``) or from standard input.
"""

from __future__ import annotations

import argparse
import contextvars
import datetime
import functools
import getpass
import inspect
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from p2pbackup import __version__
from p2pbackup.app.home import Home, default_home
from p2pbackup.engine.progress import Progress, human_bytes, terminal_line
from p2pbackup.engine.runtime import tune_process
from p2pbackup.errors import P2PBackupError, UsageError
from p2pbackup.model import NodeKind, TreeNode
from p2pbackup.node import control
from p2pbackup.nurseries import unwrap_single
from p2pbackup.stores.durable import write_private_file

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PARTIAL = 3
#: What a shell reports for a process killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


#: Where a command's output goes when the daemon runs it for a client.
_OUTPUT: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "p2pbackup_cli_output", default=None
)


def _out(line: str = "") -> None:
    writer = _OUTPUT.get()
    if writer is not None:
        writer(line)
    else:
        print(line, flush=True)


#: Where a command's progress goes when the daemon runs it for a client that
#: shows progress (None: the client shows none, or the command runs here).
_PROGRESS: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "p2pbackup_cli_progress", default=None
)


def _progress(label: str, args: argparse.Namespace) -> Progress:
    if args.json:
        return Progress(label, enabled=False)
    if _OUTPUT.get() is not None:
        # Run by the daemon: a progress line belongs on the user's terminal,
        # if the client asked for one, never on the daemon's.
        sink = _PROGRESS.get()
        return Progress(label, sink=sink, enabled=sink is not None)
    return Progress(label)


# -- commands ----------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations

    k, n = operations.parse_shards(args.shards)
    key_file = Path(args.recovery_key_file) if args.recovery_key_file else None

    def write_key(key: str) -> None:
        assert key_file is not None
        try:
            write_private_file(key_file, (key + "\n").encode())
        except OSError as exc:
            raise UsageError(
                f"cannot write the recovery key to {key_file}: {exc.strerror or exc}; "
                f"{home.path} was not initialised"
            ) from exc

    key = operations.init_home(
        home,
        operations.default_config(k, n),
        deliver_key=write_key if key_file is not None else None,
    )
    _out(f"initialised {home.path} ({k}-of-{n} shards)")
    if key_file is not None:
        _out(f"recovery key written to {key_file} (mode 0600)")
    else:
        _out("Your recovery key — write it down and keep it safe; it is shown only once.")
        _out("With it alone you can restore everything on a new machine:")
        _out()
        _out(f"    {key}")
        _out()
    _out("next: add peers with `p2pbackup peer add HOST:PORT NODE_ID` or `peer add-dir PATH`")
    return EXIT_OK


async def cmd_peer_add_dir(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations

    async with operations.open_repository(home) as repo:
        record = await operations.add_folder_peer(repo, Path(args.path))
        _out(f"added peer {record.peer_id} at {record.location}")
    return EXIT_OK


async def cmd_peer_add(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations

    async with operations.open_repository(home) as repo:
        record = await operations.add_node_peer(repo, args.address, args.node_id)
        _out(f"added peer {record.peer_id} at {record.location}")
    return EXIT_OK


async def cmd_peer_find(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import homedht, operations
    from p2pbackup.dht import discovery
    from p2pbackup.net.network import Address

    if args.count < 1:
        raise UsageError("--count must be at least 1")
    bootstrap = [Address.parse(text, allow_port_zero=False) for text in args.bootstrap or ()]
    home.require()
    remembered = homedht.remembered(home)
    assert remembered is not None  # home.require() passed
    found = await discovery.find_storage_nodes(
        remembered, count=args.count, bootstrap=bootstrap, friends=homedht.home_friends(home)
    )
    if not found:
        raise UsageError("no node in the DHT offers storage to strangers (open mode) right now")
    added: list[str] = []
    if args.add:
        async with operations.open_repository(home) as repo:
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
                    _out(f"warning: node {record.node_id.hex()} not added: {error}")
                else:
                    added.append(record.node_id.hex())
    if args.json:
        _out(
            json.dumps(
                [
                    {
                        "node_id": r.node_id.hex(),
                        "addresses": [str(Address(a.host, a.port)) for a in r.addresses],
                        "storage_offered": r.storage_offered,
                        "added": r.node_id.hex() in added,
                    }
                    for r in found
                ],
                indent=2,
            )
        )
        return EXIT_OK
    for record in found:
        where = ", ".join(str(Address(a.host, a.port)) for a in record.addresses)
        mark = " (added as a peer)" if record.node_id.hex() in added else ""
        _out(
            f"node {record.node_id.hex()} at {where} offers "
            f"{human_bytes(record.storage_offered)}{mark}"
        )
    if not args.add:
        _out("these are strangers; `p2pbackup peer find --add` makes them peers (open mode)")
    return EXIT_OK


def cmd_invite(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations

    code = operations.make_invite(home, args.address or ())
    _out("Your invite code: send it to a friend, who adds you with `p2pbackup friend add CODE`.")
    _out("It holds this node's public key and addresses (no secret); the friend's node")
    _out("accepts only a node that proves this key, whatever answers at the address.")
    _out(code)
    return EXIT_OK


async def cmd_friend_add(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations

    async with operations.open_repository(home) as repo:
        added = await operations.add_friend(repo, args.code)
    for warning in added.warnings:
        _out(f"warning: {warning}")
    where = "reached at" if added.reached else "to be reached at"
    _out(f"added friend {added.friend.node_id.hex()}, {where} {added.peer.location}")
    return EXIT_OK


async def cmd_friend_list(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations

    async with operations.open_repository(home, access="read") as repo:
        listed = operations.friends(repo)
    if args.json:
        _out(
            json.dumps(
                [
                    {
                        "node_id": s.friend.node_id.hex(),
                        "addresses": list(s.friend.addresses),
                        "location": s.location,
                        "shards": s.shards,
                        "added_at": s.friend.added_at,
                    }
                    for s in listed
                ],
                indent=2,
            )
        )
        return EXIT_OK
    for s in listed:
        _out(f"{s.friend.node_id.hex()}  {', '.join(s.friend.addresses)}  {s.shards} shards")
    if not listed:
        _out("no friends yet: add one with `p2pbackup friend add CODE` (`invite` prints yours)")
    return EXIT_OK


async def cmd_friend_remove(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations

    async with operations.open_repository(home, access="remove") as repo:
        removed = await operations.remove_friend(repo, args.id, force=args.force)
    for warning in removed.warnings:
        _out(f"warning: {warning}")
    _out(f"removed friend {removed.friend.node_id.hex()}")
    if removed.shards_forgotten:
        _out(f"forgot {removed.shards_forgotten} shards it held")
    shortfall = removed.shortfall
    if shortfall.below_n:
        _out(f"{shortfall.below_n} packs now have fewer than N shards (less redundant)")
    if shortfall.below_k:
        _out(f"{shortfall.below_k} packs have fewer than K shards left: they cannot be restored")
    return EXIT_OK


async def cmd_lookup(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import homedht, operations
    from p2pbackup.dht import discovery
    from p2pbackup.net.network import Address

    node_id = operations.parse_node_id(args.node_id)
    bootstrap = [Address.parse(text, allow_port_zero=False) for text in args.bootstrap or ()]
    friends = homedht.home_friends(home) if home.exists() else []
    record = await discovery.lookup_contact(
        homedht.remembered(home), node_id, bootstrap=bootstrap, friends=friends
    )
    if record is None:
        raise UsageError(
            f"no valid contact record for node {node_id.hex()} in the DHT: the node may be "
            "offline for longer than its record lives, or unknown to the nodes reached"
        )
    addresses = [str(Address(a.host, a.port)) for a in record.addresses]
    expires = datetime.datetime.fromtimestamp(record.expiry).astimezone()
    if args.json:
        _out(
            json.dumps(
                {
                    "node_id": record.node_id.hex(),
                    "public_key": record.public_key.hex(),
                    "addresses": addresses,
                    "storage_offered": record.storage_offered,
                    "sequence": record.sequence,
                    "expiry": record.expiry,
                    "expires": expires.isoformat(timespec="seconds"),
                },
                indent=2,
            )
        )
        return EXIT_OK
    _out(f"node {record.node_id.hex()}")
    _out(f"addresses: {', '.join(addresses)}")
    _out(f"storage offered: {human_bytes(record.storage_offered)}")
    _out(f"record #{record.sequence}, expires {expires.isoformat(timespec='seconds')}")
    return EXIT_OK


def cmd_id(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app.daemon import node_identity

    identity = node_identity(home)
    if args.json:
        _out(json.dumps({"node_id": identity.node_id.hex()}))
    else:
        _out(f"node id of {home.path}:")
        _out(identity.node_id.hex())
    return EXIT_OK


def parse_size(text: str) -> int:
    """``500M``, ``20G``, ``1T`` or plain bytes (binary units); the rules of
    ``config.toml``'s sizes (:func:`p2pbackup.node.schedule.parse_size`)."""
    from p2pbackup.node import schedule

    return schedule.parse_size(text)


class _JsonLines(logging.Formatter):
    """One JSON object a line: easy to read back, grep and ship elsewhere."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def _log_to_file(path: Path, level: int = logging.INFO, *, max_bytes: int = 10 << 20) -> None:
    """Everything at ``level`` (at most INFO) and above also goes to ``path``
    (0600, rotated at 10 MB; every file it rotates to is 0600 too)."""
    import logging.handlers

    class PrivateRotatingFile(logging.handlers.RotatingFileHandler):
        def _open(self) -> Any:
            # Each new log file is made 0600 whatever the umask: it names
            # peers, addresses and paths.
            fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            return open(fd, "a", encoding=self.encoding, errors=self.errors)

    handler = PrivateRotatingFile(path, maxBytes=max_bytes, backupCount=3, encoding="utf-8")
    handler.setLevel(min(level, logging.INFO))
    handler.setFormatter(_JsonLines())
    root = logging.getLogger()
    root.addHandler(handler)
    # The root level gates every handler: let INFO through to the file, and
    # keep stderr at the level asked for.
    for other in root.handlers:
        if other is not handler:
            other.setLevel(root.level)
    root.setLevel(min(root.level, handler.level))


#: ``serve --log-level`` names.
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}  # fmt: skip


async def cmd_serve(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import daemon
    from p2pbackup.net.network import Address
    from p2pbackup.node.schedule import StorageOffer, load_config

    # A node runs unattended: what goes wrong with a peer is logged, not raised.
    level = LOG_LEVELS[args.log_level] if args.log_level else logging.WARNING
    if args.verbose:
        level = min(level, logging.INFO)
    logging.basicConfig(
        stream=sys.stderr, level=level, format="p2pbackup serve: %(levelname)s: %(message)s"
    )
    if home.exists():
        _log_to_file(home.log_path, level)
    # What the home offers: config.toml's [storage], unless the command line says.
    offer = load_config(home.config_path).storage if home.exists() else StorageOffer()
    options = daemon.ServeOptions(
        listen=Address.parse(args.listen) if args.listen else daemon.DEFAULT_LISTEN,
        capacity=parse_size(args.capacity) if args.capacity else offer.capacity,
        owner_quota=parse_size(args.owner_quota) if args.owner_quota else offer.per_friend,
        bootstrap=tuple(
            Address.parse(text, allow_port_zero=False) for text in args.bootstrap or ()
        ),
        advertise=tuple(
            Address.parse(text, allow_port_zero=False) for text in args.advertise or ()
        ),
        open=args.open,
    )
    async with trio.open_nursery() as nursery:
        serving = await nursery.start(
            functools.partial(
                daemon.serve, home, options, control=functools.partial(run_forwarded, home)
            )
        )
        report = serving.reconciled
        for line in report.describe():
            _out(line)
        _out(f"node {serving.node_id.hex()}")
        _out(f"serving on {serving.address}")
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _signal in signals:
                _out("stopping")
                nursery.cancel_scope.cancel()
                break
    return EXIT_OK


async def cmd_status(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations
    from p2pbackup.engine import status

    async with operations.open_repository(home, access="read") as repo:
        report = await status.gather_status(repo, operations.hosting(home))
    if args.json:
        _out(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            _out(line)
    return EXIT_OK


async def cmd_peer_list(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations

    async with operations.open_repository(home, access="read") as repo:
        counts = repo.index.shard_count_by_peer()
        peers = repo.peers()
        if args.json:
            _out(
                json.dumps(
                    [
                        {
                            "peer_id": p.peer_id,
                            "kind": p.kind,
                            "location": p.location,
                            "shards": counts.get(p.peer_id, 0),
                        }
                        for p in peers
                    ],
                    indent=2,
                )
            )
        else:
            for p in peers:
                _out(f"{p.peer_id}  {p.kind}  {p.location}  {counts.get(p.peer_id, 0)} shards")
            if not peers:
                _out("no peers yet: add one with `p2pbackup peer add` or `peer add-dir`")
    return EXIT_OK


async def cmd_backup(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations
    from p2pbackup.core.exclude import ExcludeRules
    from p2pbackup.engine.backup import Backup

    exclude = ExcludeRules.from_patterns(args.exclude or ())
    async with operations.open_repository(home) as repo:
        summary = await Backup(repo, progress=_progress("backup", args), exclude=exclude).run(
            args.paths, args.tag or ()
        )
    if args.json:
        _out(json.dumps(summary.to_json(), indent=2))
    else:
        for line in summary.lines():
            _out(line)
        _out("snapshot saved:")
        _out(summary.snapshot_id.hex())
    return EXIT_OK


async def cmd_snapshots(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations

    async with operations.open_repository(home, access="read") as repo:
        rows = repo.index.snapshots()
    if args.json:
        _out(
            json.dumps(
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
                ],
                indent=2,
            )
        )
        return EXIT_OK
    if not rows:
        _out("no snapshots yet")
    for sid, s in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.time_ns / 1e9))
        paths = ", ".join(os.fsdecode(p) for p in s.paths)
        tags = f"  [{', '.join(s.tags)}]" if s.tags else ""
        _out(
            f"{sid.hex()[:12]}  {when}  {s.hostname}  {s.file_count} files  "
            f"{human_bytes(s.total_size)}  {paths}{tags}"
        )
    return EXIT_OK


def _describe(path: bytes, node: TreeNode) -> str:
    kind = {NodeKind.DIR: "d", NodeKind.FILE: "-", NodeKind.SYMLINK: "l"}[node.kind]
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


async def cmd_ls(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations
    from p2pbackup.engine import snapshots

    async with operations.open_repository(home, access="read") as repo:
        _sid, snap = snapshots.resolve(repo.index, args.snapshot)
        entries = []
        async for path, node in snapshots.walk(repo, snap, os.fsencode(args.path or "/")):
            entries.append((path, node))
    if args.json:
        _out(
            json.dumps(
                [_ls_json(p, n) for p, n in entries],
                indent=2,
            )
        )
    else:
        for path, node in entries:
            _out(_describe(path, node))
    return EXIT_OK


async def cmd_restore(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations
    from p2pbackup.engine import snapshots
    from p2pbackup.engine.restore import Restorer

    async with operations.open_repository(home, access="read") as repo:
        sid, snap = snapshots.resolve(repo.index, args.snapshot)
        only = os.fsencode(args.path) if args.path else None
        restorer = Restorer(
            repo,
            Path(args.target),
            overwrite=args.overwrite,
            progress=_progress("restore", args),
        )
        summary = await restorer.run(snap, only)
    if args.json:
        _out(json.dumps(summary.to_json(), indent=2))
    else:
        _out(f"snapshot {sid.hex()[:12]} → {restorer.target}")
        for line in summary.lines():
            _out(line)
    if not summary.ok:
        print("p2pbackup: error: the restore is incomplete (see the list above)", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


async def cmd_forget(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations
    from p2pbackup.engine import snapshots

    async with operations.open_repository(home, access="remove") as repo:
        removed = await snapshots.forget(repo, args.snapshots)
    for sid in removed:
        _out(f"forgot snapshot {sid.hex()[:12]}")
    _out("run `p2pbackup prune` to free the space only they used")
    return EXIT_OK


async def cmd_prune(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations
    from p2pbackup.engine.prune import prune

    async with operations.open_repository(home, access="remove") as repo:
        summary = await prune(repo, progress=_progress("prune", args))
    if args.json:
        _out(json.dumps(attrs.asdict(summary), indent=2))
    else:
        for line in summary.lines():
            _out(line)
    return EXIT_OK


async def cmd_check(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations
    from p2pbackup.engine.check import check

    async with operations.open_repository(home, access="read") as repo:
        summary = await check(repo, read_data=args.read_data, progress=_progress("check", args))
    if args.json:
        _out(json.dumps(summary.to_json(), indent=2))
    else:
        for line in summary.lines():
            _out(line)
    return EXIT_OK if summary.ok else EXIT_PARTIAL


def read_recovery_key(path: str | None) -> str:
    """From a file, or standard input (prompted, unechoed, on a terminal)."""
    if path:
        try:
            return Path(path).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read the recovery key file {path}: {exc.strerror}") from exc
    if sys.stdin.isatty():
        return getpass.getpass("recovery key: ")
    return sys.stdin.read()


async def cmd_recover(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations
    from p2pbackup.net.network import Address

    if not args.peer_dir and not args.peer and not args.friend and not args.bootstrap:
        raise UsageError(
            "recover needs a way to the peers: --friend INVITE_CODE (a friend's code), "
            "--bootstrap HOST:PORT (any node of the DHT), --peer HOST:PORT NODE_ID "
            "or --peer-dir PATH"
        )
    nodes = [(address, node_id) for address, node_id in args.peer or []]
    for code in args.friend or []:
        nodes.extend(operations.invite_nodes(code))
    bootstrap = [Address.parse(text, allow_port_zero=False) for text in args.bootstrap or ()]
    key = read_recovery_key(args.recovery_key_file)
    summary = await operations.recover(
        home, key, [Path(p) for p in args.peer_dir or []], nodes, bootstrap=bootstrap
    )
    _out(f"recovered into {home.path}")
    for line in summary.lines():
        _out(line)
    _out("next: `p2pbackup snapshots`, then `p2pbackup restore latest --target DIR`")
    return EXIT_OK


async def cmd_demo(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app.demo import run_demo

    return await run_demo(
        Path(args.dir) if args.dir else None, keep=args.keep, folders=args.folders
    )


async def cmd_devnet(args: argparse.Namespace, home: Home) -> int:
    from p2pbackup.app import operations
    from p2pbackup.app.devnet import run_devnet

    # Without --shards, the default code, adapted to the friends there are.
    config = (
        operations.default_config(*operations.parse_shards(args.shards)) if args.shards else None
    )
    return await run_devnet(Path(args.dir) if args.dir else None, args.nodes, config=config)


# -- parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pbackup",
        description="Peer-to-peer encrypted, deduplicated, erasure-coded backup.",
    )
    parser.add_argument("--version", action="version", version=f"p2pbackup {__version__}")
    parser.add_argument(
        "--home", help="home directory (default: $P2PBACKUP_HOME, else the user data dir)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a new home and show its recovery key")
    p.add_argument(
        "--shards",
        default="3/6",
        metavar="K/N",
        help="any K of N shards restore a pack (default 3/6)",
    )
    p.add_argument(
        "--recovery-key-file",
        metavar="F",
        help="write the recovery key to F (mode 0600) instead of showing it",
    )
    p.set_defaults(func=cmd_init)

    peer = sub.add_parser("peer", help="manage peers")
    peer_sub = peer.add_subparsers(dest="peer_command", required=True, metavar="COMMAND")
    p = peer_sub.add_parser("add-dir", help="use a local folder (e.g. an external disk) as a peer")
    p.add_argument("path")
    p.set_defaults(func=cmd_peer_add_dir)
    p = peer_sub.add_parser("add", help="use a storage node on the network as a peer")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("node_id", metavar="NODE_ID", help="as `p2pbackup id` prints it on that node")
    p.set_defaults(func=cmd_peer_add)
    p = peer_sub.add_parser("list", help="list peers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_peer_list)
    p = peer_sub.add_parser(
        "find", help="open mode: find nodes in the DHT that store for anyone (strangers)"
    )
    p.add_argument("--count", type=int, default=8, help="how many to look for (default 8)")
    p.add_argument("--add", action="store_true", help="make the nodes found peers")
    p.add_argument("--bootstrap", action="append", metavar="HOST:PORT", help="DHT entry point")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_peer_find)

    friend = sub.add_parser("friend", help="manage friends (nodes added with an invite code)")
    friend_sub = friend.add_subparsers(dest="friend_command", required=True, metavar="COMMAND")
    p = friend_sub.add_parser("add", help="add a friend's node from its invite code")
    p.add_argument("code", metavar="CODE", help="as `p2pbackup invite` prints it on that node")
    p.set_defaults(func=cmd_friend_add)
    p = friend_sub.add_parser("list", help="list friends and the shards they hold")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_friend_list)
    p = friend_sub.add_parser("remove", help="forget a friend (and it as a peer)")
    p.add_argument("id", metavar="ID", help="node id, or a unique prefix of 8 or more digits")
    p.add_argument(
        "--force", action="store_true", help="also forget the shards it holds of this home"
    )
    p.set_defaults(func=cmd_friend_remove)

    p = sub.add_parser("invite", help="print this node's invite code for a friend")
    p.add_argument(
        "--address",
        action="append",
        metavar="HOST:PORT",
        help="where friends reach this node (repeatable; default: what `serve` last published)",
    )
    p.set_defaults(func=cmd_invite)

    p = sub.add_parser("lookup", help="find a node's contact record in the DHT")
    p.add_argument("node_id", metavar="NODE_ID")
    p.add_argument(
        "--bootstrap", action="append", metavar="HOST:PORT", help="a DHT node to ask (repeatable)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lookup)

    p = sub.add_parser("id", help="show this home's node id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_id)

    p = sub.add_parser("serve", help="store shards for peers (runs until interrupted)")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (default: every interface, port 47470; port 0 picks one)",
    )
    p.add_argument("--capacity", metavar="SIZE", help="most space to give all peers (e.g. 200G)")
    p.add_argument("--owner-quota", metavar="SIZE", help="most space to give any one peer")
    p.add_argument(
        "--bootstrap",
        action="append",
        metavar="HOST:PORT",
        help="a DHT node to join through, besides friends (repeatable)",
    )
    p.add_argument(
        "--advertise",
        action="append",
        metavar="HOST:PORT",
        help="an address to publish for this node (repeatable; default: from --listen)",
    )
    p.add_argument(
        "--open",
        action="store_true",
        help="store for any node that asks (within quotas), not only for friends",
    )
    p.add_argument(
        "--verbose", action="store_true", help="log every session, not only what goes wrong"
    )
    p.add_argument(
        "--log-level",
        choices=sorted(LOG_LEVELS, key=LOG_LEVELS.__getitem__),
        help="what goes to stderr (default warning; --verbose: info); "
        "HOME/serve.log always has info and above",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="this node, each peer now, and the health of the data")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("backup", help="back up files and directories")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="leave out names (*.tmp, .cache) or absolute paths (/home/me/Downloads) "
        "that match (repeatable)",
    )
    p.add_argument("--tag", action="append", help="tag the snapshot (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("snapshots", help="list snapshots")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser("ls", help="list the contents of a snapshot")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="id, unique prefix, or 'latest'")
    p.add_argument("path", nargs="?", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("restore", help="restore a snapshot into a directory")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="id, unique prefix, or 'latest'")
    p.add_argument("--target", required=True, metavar="DIR")
    p.add_argument("--path", metavar="P", help="restore only this path of the snapshot")
    p.add_argument("--overwrite", action="store_true", help="replace existing files that differ")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("forget", help="drop snapshots (prune frees their space)")
    p.add_argument("snapshots", nargs="+", metavar="SNAPSHOT")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("prune", help="delete data no snapshot needs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("check", help="verify the index against the peers")
    p.add_argument(
        "--read-data", action="store_true", help="download and verify every shard and blob"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("recover", help="rebuild a home from the recovery key and the peers")
    p.add_argument(
        "--recovery-key-file",
        metavar="F",
        help="read the recovery key from F (default: standard input)",
    )
    p.add_argument(
        "--peer-dir",
        action="append",
        metavar="PATH",
        help="a peer folder (repeatable; one is enough when it names the others)",
    )
    p.add_argument(
        "--peer",
        action="append",
        nargs=2,
        metavar=("HOST:PORT", "NODE_ID"),
        help="a storage node (repeatable; one is enough when it names the others)",
    )
    p.add_argument(
        "--friend",
        action="append",
        metavar="INVITE_CODE",
        help="a friend's invite code (repeatable; one friend holding the root record is enough)",
    )
    p.add_argument(
        "--bootstrap",
        action="append",
        metavar="HOST:PORT",
        help="any node of the DHT (repeatable): the home's root pointer there names "
        "the nodes holding its root record",
    )
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser(
        "demo", help="a local network: back up, kill nodes, lose the home, recover, compare"
    )
    p.add_argument("--dir", metavar="D", help="work here (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the demo's files afterwards")
    p.add_argument(
        "--folders",
        action="store_true",
        help="the story with six folder peers instead of a network of nodes",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "devnet", help="run N befriended nodes on 127.0.0.1 to try things on (until Ctrl-C)"
    )
    p.add_argument(
        "--nodes", type=int, default=6, metavar="N", help="how many nodes (default 6, at least 4)"
    )
    p.add_argument(
        "--dir", metavar="D", help="put their homes here (default: a new temporary directory)"
    )
    p.add_argument(
        "--shards",
        metavar="K/N",
        help="every home's code: any K of N shards restore a pack (N at most the nodes "
        "less one; default 3/6, made smaller when a home has fewer than 6 friends)",
    )
    p.set_defaults(func=cmd_devnet)
    return parser


def _tolerate_undecodable_names() -> None:
    """File names that are not UTF-8 reach us as surrogate escapes (PEP 383);
    print them as the bytes they are instead of failing on a strict stdout."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and getattr(sys.stdout, "errors", None) == "strict":
        reconfigure(errors="surrogateescape")


#: Commands a running daemon of the home runs for the CLI (those that open
#: the home's repository), and the arguments that are paths on the user's side.
_FORWARDED_PATHS: dict[str, tuple[str, ...]] = {
    "cmd_backup": ("paths",),
    "cmd_restore": ("target",),
    "cmd_peer_add_dir": ("path",),
    "cmd_snapshots": (),
    "cmd_ls": (),
    "cmd_forget": (),
    "cmd_prune": (),
    "cmd_check": (),
    "cmd_status": (),
    "cmd_peer_add": (),
    "cmd_peer_list": (),
    "cmd_peer_find": (),
    "cmd_friend_add": (),
    "cmd_friend_list": (),
    "cmd_friend_remove": (),
}


def _error_message(exc: BaseException) -> str | None:
    """The one line a user sees for an expected failure; None for a bug."""
    if isinstance(exc, P2PBackupError):
        return str(exc)
    if isinstance(exc, OSError):
        # Permissions, a full disk, a vanished directory: the user's to fix.
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return None


async def run_forwarded(
    home: Home,
    argv: list[str],
    cwd: str,
    write: Callable[[str], None],
    progress: Callable[[str], None] | None = None,
) -> tuple[int, str]:
    """Run a client's command in the daemon (the control socket's handler):
    (exit code, error message). Relative paths are the client's."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        return 2, "the daemon could not read that command line; run it with P2PBACKUP_LOCAL=1"
    func = args.func
    if func.__name__ not in _FORWARDED_PATHS:
        return 2, f"the daemon does not run `{args.command}`; run it with P2PBACKUP_LOCAL=1"
    if not hasattr(args, "json"):
        args.json = False
    logging.getLogger("p2pbackup.node.control").info("running `%s` for a client", args.command)
    for name in _FORWARDED_PATHS[func.__name__]:
        value = getattr(args, name, None)
        if isinstance(value, list):
            setattr(args, name, [os.path.join(cwd, v) for v in value])
        elif isinstance(value, str):
            setattr(args, name, os.path.join(cwd, value))
    token = _OUTPUT.set(write)
    progress_token = _PROGRESS.set(progress)
    try:
        with unwrap_single():
            return int(await func(args, home)), ""
    except (P2PBackupError, OSError) as exc:
        message = _error_message(exc)
        assert message is not None
        return EXIT_ERROR, message
    finally:
        _PROGRESS.reset(progress_token)
        _OUTPUT.reset(token)


def _forward(home: Home, args: argparse.Namespace, argv: list[str]) -> int | None:
    """Hand the command to this home's daemon if one runs; None otherwise."""
    if args.func.__name__ not in _FORWARDED_PATHS or os.environ.get("P2PBACKUP_LOCAL") == "1":
        return None
    if not home.control_path.exists():
        return None

    def error(message: str) -> None:
        print(f"p2pbackup: error: {message}", file=sys.stderr)

    shows_progress = sys.stderr.isatty() and not getattr(args, "json", False)
    return trio.run(
        functools.partial(
            control.forward,
            home.control_path,
            argv,
            os.getcwd(),
            write=lambda line: print(line, flush=True),
            report=error,
            progress=terminal_line(sys.stderr) if shows_progress else None,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    _tolerate_undecodable_names()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    tune_process()
    if not hasattr(args, "json"):
        args.json = False
    home = Home(Path(args.home) if args.home else default_home())
    func: Callable[[argparse.Namespace, Home], Any] = args.func
    try:
        with unwrap_single():
            forwarded = _forward(home, args, argv)
            if forwarded is not None:
                return forwarded
            if inspect.iscoroutinefunction(func):
                return int(trio.run(func, args, home))
            return int(func(args, home))
    except BrokenPipeError:
        # The reader went away (`p2pbackup status | head`): stop quietly, as
        # a process killed by SIGPIPE would, without a second error when
        # Python flushes stdout on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (P2PBackupError, OSError) as exc:
        print(f"p2pbackup: error: {_error_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("p2pbackup: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
