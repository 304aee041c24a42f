"""The ``p2pbackup`` command line.

Every command prints what it did in plain lines (``--json`` where scripts read
the output). Expected failures — a bad path, a typo in a recovery key, too few
shards — print one ``p2pbackup: error: …`` line and exit 1; a traceback means
a bug. Secrets never appear on the command line: recovery keys are read from a
file (``--recovery-key-file``) or from standard input.

The commands on a home's repository become typed requests
(:mod:`p2pbackup.app.requests`) that the service (:mod:`p2pbackup.app.service`)
runs: in the home's running ``serve``, over its control socket, when there is
one; else here. Either way their lines, progress, error and exit code reach
this process. The other commands (``init``, ``recover``, ``invite``, ``id``,
``lookup``, ``serve``, ``ui``, ``alerts test``, ``demo``, ``devnet``) always run here.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import getpass
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import attrs
import trio

from p2pbackup import __version__
from p2pbackup.app import requests
from p2pbackup.app.home import Home, default_home
from p2pbackup.app.service import EXIT_ERROR, EXIT_OK, Console, Service, error_message
from p2pbackup.engine.progress import human_bytes, terminal_line
from p2pbackup.engine.runtime import tune_process
from p2pbackup.errors import P2PBackupError, UsageError
from p2pbackup.node import control
from p2pbackup.node.control import ControlRequest, LineSink, Outcome
from p2pbackup.nurseries import unwrap_single
from p2pbackup.stores.durable import write_private_file

#: What a shell reports for a process killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


# -- commands this process runs itself ----------------------------------------------
#
# The commands on a home's repository are the service's (app/service.py): the
# parser names their request classes, and a running daemon may run them. These
# are the others: they make a home, only read its files, or run for long
# themselves. Each takes the parsed arguments, the home and where its lines go.


def cmd_init(args: argparse.Namespace, home: Home, out: LineSink) -> int:
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
    if args.json:
        data: dict[str, object] = {"home": str(home.path), "k": k, "n": n}
        data["node_id"] = home.node_id().hex()
        if key_file is not None:
            data["recovery_key_file"] = str(key_file)
        else:
            # Shown once, as the lines below show it: the user asked for it here.
            data["recovery_key"] = key
        out(json.dumps(data, indent=2))
        return EXIT_OK
    out(f"initialised {home.path} ({k}-of-{n} shards)")
    if key_file is not None:
        out(f"recovery key written to {key_file} (mode 0600)")
    else:
        out("Your recovery key — write it down and keep it safe; it is shown only once.")
        out("With it alone you can restore everything on a new machine:")
        out("")
        out(f"    {key}")
        out("")
    out("next, with friends: `p2pbackup serve`, then `p2pbackup invite` and send the code to")
    out("      a friend, who runs `p2pbackup friend add CODE` (and you, theirs)")
    out("  or, on your own: `p2pbackup peer add-dir PATH` (a disk, a mounted share), or")
    out("      `p2pbackup peer add HOST:PORT NODE_ID` (a storage node)")
    return EXIT_OK


def cmd_invite(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    from p2pbackup.app import operations

    code = operations.make_invite(home, args.address or ())
    if args.json:
        nodes = operations.invite_nodes(code)
        out(
            json.dumps(
                {
                    "code": code,
                    "node_id": nodes[0][1],
                    "addresses": [address for address, _node_id in nodes],
                },
                indent=2,
            )
        )
        return EXIT_OK
    out("Your invite code: send it to a friend, who adds you with `p2pbackup friend add CODE`.")
    out("It holds this node's public key and addresses (no secret); the friend's node")
    out("accepts only a node that proves this key, whatever answers at the address.")
    out(code)
    return EXIT_OK


async def cmd_lookup(args: argparse.Namespace, home: Home, out: LineSink) -> int:
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
        out(
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
    out(f"node {record.node_id.hex()}")
    out(f"addresses: {', '.join(addresses)}")
    out(f"storage offered: {human_bytes(record.storage_offered)}")
    out(f"record #{record.sequence}, expires {expires.isoformat(timespec='seconds')}")
    return EXIT_OK


def cmd_id(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    # The node id its identity key gives (as the node presents it), from the
    # keyring alone: the daemon module would bring the whole node with it.
    from p2pbackup.core.keys import Keyring

    node_id = Keyring.from_master_secret(home.load_secret()).node_id
    if args.json:
        out(json.dumps({"node_id": node_id.hex()}))
    else:
        out(f"node id of {home.path}:")
        out(node_id.hex())
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


async def cmd_serve(args: argparse.Namespace, home: Home, out: LineSink) -> int:
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
        port_mapping=not args.no_port_mapping,
        via_relays=args.via_relays,
    )
    ui = _ui_role(args, home, options.listen)
    async with trio.open_nursery() as nursery:
        serving = await nursery.start(
            functools.partial(
                daemon.serve,
                home,
                options,
                control=Service(home).answer,
                extra_roles=[ui.run] if ui is not None else [],
            )
        )
        report = serving.reconciled
        for line in report.describe():
            out(line)
        out(f"node {serving.node_id.hex()}")
        out(f"serving on {serving.address}")
        schedule = load_config(home.config_path).backup
        out(
            schedule.describe()
            if schedule is not None
            else "no scheduled backups (config.toml has no [backup] table)"
        )
        if ui is not None and ui.url is not None:
            out(f"dashboard on {ui.url} (`p2pbackup ui` prints it with its token)")
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _signal in signals:
                out("stopping")
                nursery.cancel_scope.cancel()
                break
    return EXIT_OK


def _ui_role(args: argparse.Namespace, home: Home, listen: Any) -> Any:
    """The dashboard and alerts role ``serve`` asks for (None without a home)."""
    from p2pbackup.ui import access
    from p2pbackup.ui.role import UiOptions, UiRole
    from p2pbackup.ui.settings import load_settings

    if not home.exists():
        return None  # serve refuses it itself
    settings = load_settings(home.config_path)
    if args.ui_listen and args.ui_port is None:
        host, port = _ui_address(args.ui_listen)
    else:
        host = "127.0.0.1"
        # A node on a port the system picks gets a dashboard on one too.
        default = 0 if listen.port == 0 else access.DEFAULT_UI_PORT
        chosen: int | None = args.ui_port if args.ui_port is not None else settings.ui.port
        port = default if chosen is None else chosen
        if args.ui_listen:
            host = _ui_address(args.ui_listen)[0]
    return UiRole(home, UiOptions(not args.no_ui, host, port, alerts=settings.alerts))


def _ui_address(text: str) -> tuple[str, int]:
    from p2pbackup.net.network import Address

    address = Address.parse(text)
    return address.host, address.port


def cmd_ui(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    import webbrowser

    from p2pbackup.ui import access
    from p2pbackup.ui.settings import load_settings

    home.require()
    address = access.read_address(home.path)
    if address is None or home.serving_pid() is None:
        port = load_settings(home.config_path).ui.port or access.DEFAULT_UI_PORT
        address = access.http_address("127.0.0.1", port)
        out(f"no serve of {home.path} is running: start `p2pbackup serve`, then open:")
    else:
        out("the dashboard of this home (the address holds its token: keep it to yourself):")
    url = access.dashboard_url(address, access.load_token(home.path))
    if not args.no_browser and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        webbrowser.open(url)
    out(url)
    return EXIT_OK


async def cmd_alerts_test(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    from p2pbackup.ui import alerts, notify
    from p2pbackup.ui.settings import load_settings

    home.require()
    config = load_settings(home.config_path).alerts
    if not config.targets:
        raise UsageError(f"{home.config_path} sets no alert targets ([alerts] webhook or email)")
    results = await notify.deliver(config.targets, alerts.test_event(), home.node_id().hex())
    for result in results:
        out(f"{result.target}: {'sent' if not result.problem else 'FAILED: ' + result.problem}")
    failed = [r for r in results if r.problem]
    if failed:
        raise UsageError(f"{len(failed)} of {len(results)} alert targets did not take the test")
    return EXIT_OK


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


async def cmd_recover(args: argparse.Namespace, home: Home, out: LineSink) -> int:
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
        home,
        key,
        [Path(p) for p in args.peer_dir or []],
        nodes,
        bootstrap=bootstrap,
        partial=args.partial,
    )
    if args.json:
        out(json.dumps({"home": str(home.path), **attrs.asdict(summary)}, indent=2))
        return EXIT_OK
    out(f"recovered into {home.path}")
    for line in summary.lines():
        out(line)
    out("next: `p2pbackup snapshots`, then `p2pbackup restore latest --target DIR`")
    return EXIT_OK


async def cmd_demo(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    from p2pbackup.app.demo import run_demo

    return await run_demo(
        Path(args.dir) if args.dir else None, keep=args.keep, folders=args.folders
    )


async def cmd_devnet(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    from p2pbackup.app import operations
    from p2pbackup.app.devnet import run_devnet

    # Without --shards, the default code, adapted to the friends there are.
    config = (
        operations.default_config(*operations.parse_shards(args.shards)) if args.shards else None
    )
    return await run_devnet(Path(args.dir) if args.dir else None, args.nodes, config=config)


def _durability_params(args: argparse.Namespace, k: int, n: int) -> Any:
    """The model's parameters from ``sim durability``'s options."""
    from p2pbackup.maintenance.repair import RepairPolicy
    from p2pbackup.sim import durability

    repair = None
    if not args.no_repair:
        if args.repair_days is None:
            raise UsageError(
                "give --repair-threshold R --repair-days T, or --no-repair for no repair"
            )
        threshold = args.repair_threshold
        if threshold is None:
            threshold = RepairPolicy().threshold(k, n)
        bandwidth = None if args.repair_mbps is None else args.repair_mbps * 1e6 / 8
        repair = durability.RepairModel.with_threshold(
            k,
            n,
            threshold,
            grace_days=args.grace_days,
            repair_days=args.repair_days,
            bandwidth=bandwidth,
        )
    return durability.DurabilityParams(
        k=k,
        n=n,
        nodes=args.nodes,
        packs=args.packs,
        node_mttf_days=args.node_mttf_days,
        years=args.years,
        repair=repair,
        availability=args.availability,
        detect_days=args.detect_days,
    )


def cmd_sim_durability(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    import random

    from p2pbackup.app import operations
    from p2pbackup.sim import durability

    if args.no_repair and (args.repair_threshold is not None or args.repair_days is not None):
        raise UsageError("--no-repair takes no --repair-threshold or --repair-days")
    k, n = operations.parse_shards(args.shards)
    params = _durability_params(args, k, n)
    summary = durability.summary(durability.simulate(params, random.Random(args.seed)))
    summary["seed"] = args.seed
    if args.json:
        out(json.dumps(summary))
        return EXIT_OK
    for line in _durability_lines(summary):
        out(line)
    return EXIT_OK


def _durability_lines(s: dict[str, Any]) -> list[str]:
    if s["repair_threshold"] is None:
        repair = "no repair"
    else:
        repair = (
            f"repair below {s['repair_threshold']} shards after a grace of "
            f"{s['grace_days']:g} days, {s['repair_days']:g} days each"
        )
    low, high = s["simulated_loss_interval_95"]
    lines = [
        f"{s['shards']}, {repair}; {s['nodes']} nodes (mean lifetime "
        f"{s['node_mttf_days']:g} days, online {s['availability']:.0%} of the day), "
        f"{s['packs']} packs, {s['years']:g} years, seed {s['seed']}",
        f"packs lost: {s['packs_lost']} of {s['packs']}",
        f"loss per pack-year: {s['simulated_loss_per_pack_year']:.3g} simulated "
        f"(95 % interval {low:.3g} to {high:.3g}), "
        f"{s['analytic_loss_per_pack_year']:.3g} by the closed form",
    ]
    if s["available_fraction"] is not None:
        lines.append(f"packs readable at a random moment: {s['available_fraction']:.2%}")
    if s["repair_threshold"] is not None:
        lines.append(
            f"repair: {s['repairs']} repairs, {s['shards_rebuilt']} shards rebuilt, "
            f"{human_bytes(s['repair_bytes'])} moved"
        )
    return lines


def _number_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An option's type: comma-separated values of ``kind``."""

    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None

    return parse


def _threshold(text: str) -> int | None:
    return None if text.strip() == "none" else int(text)


def cmd_sim_sweep(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    from p2pbackup.app import operations
    from p2pbackup.sim import sweep

    codes = [operations.parse_shards(text) for text in args.shards.split(",")]
    request = sweep.SweepRequest(
        codes=tuple(codes),
        thresholds=tuple(args.repair_threshold),
        grace_days=tuple(args.grace_days),
        mttf_days=tuple(args.node_mttf_days),
        repair_days=args.repair_days,
        years=args.years,
        nodes=args.nodes,
        packs=args.packs,
        availability=args.availability,
        seed=args.seed,
        scheduler=args.scheduler,
        workers=args.workers,
    )
    results = sweep.run_in_child(request)
    if args.json:
        out(json.dumps({"seed": args.seed, "points": results}))
        return EXIT_OK
    out(f"{len(results)} points, {args.nodes} nodes, {args.packs} packs, {args.years:g} years")
    out("K/N    r     grace  lifetime  lost  loss/pack-year (95 %)            closed form")
    for s in results:
        low, high = s["simulated_loss_interval_95"]
        r = "-" if s["repair_threshold"] is None else str(s["repair_threshold"])
        grace = "-" if s["grace_days"] is None else f"{s['grace_days']:g}d"
        out(
            f"{s['shards']:<6} {r:<5} {grace:<6} {s['node_mttf_days']:>7g}d  "
            f"{s['packs_lost']:>4}  {s['simulated_loss_per_pack_year']:.3g} "
            f"({low:.3g}–{high:.3g})".ljust(66)
            + f" {s['analytic_loss_per_pack_year']:.3g}"
        )
    return EXIT_OK


def cmd_sim_run(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    """Play a scenario out: the real node in virtual time (p2pbackup.sim.world)."""
    import shutil

    from p2pbackup.engine.progress import Progress
    from p2pbackup.sim import report, world
    from p2pbackup.sim import scenario as sc

    path = Path(args.scenario)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read the scenario {path}: {reason}") from None
    scenario = sc.parse(text, str(path))
    if args.small:
        scenario = scenario.small_size()
    scenario = scenario.resized(nodes=args.nodes, days=args.days)
    if args.seed is not None:
        scenario = attrs.evolve(scenario, seed=args.seed)
    if args.out is not None:
        out_dir = Path(args.out)
        if out_dir.exists() and any(out_dir.iterdir()):
            raise UsageError(f"--out {out_dir} is not empty; give a new or empty directory")
        out_dir.mkdir(parents=True, exist_ok=True)
    work = world.work_directory()
    progress = Progress(f"sim {scenario.name}", enabled=None if not args.json else False)
    width = 30

    # A run stopped by Ctrl-C or `kill` tidies up: its homes, on tmpfs,
    # hold up to gigabytes of memory. The signal is noted and acted on at
    # the run's next step, from inside it, where an exception ends trio's
    # run as any task's would. Trio's own SIGINT handling is not used: it
    # raises wherever the main thread happens to be, and there (a
    # finaliser, a library's callback) the interrupt can be lost. A second
    # signal stops the run at once.
    stopping: list[int] = []

    def note_signal(signum: int, _frame: object) -> None:
        if stopping:
            raise KeyboardInterrupt
        stopping.append(signum)

    def show(day: float) -> None:
        if stopping:
            raise KeyboardInterrupt
        done = round(width * day / scenario.days)
        progress.update(f"[{'#' * done}{'.' * (width - done)}] day {day:.1f} of {scenario.days:g}")

    # SIGINT stays ignored where it was (a job started in the background).
    stop_on = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        stop_on.append(signal.SIGINT)
    previous = {signum: signal.signal(signum, note_signal) for signum in stop_on}
    try:
        outcome = world.run(
            scenario,
            work,
            None if args.out is None else Path(args.out) / "events.jsonl",
            node_log=None if args.out is None else Path(args.out) / "node.log",
            progress=show,
        )
        if stopping:  # noted after the run's last step
            raise KeyboardInterrupt
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        progress.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = outcome.summary
    note = None
    if args.out is not None:
        from p2pbackup.sim import plots

        out_dir = Path(args.out)
        report.write_figures(out_dir / "figures.json", summary, outcome.figures)
        if plots.available():
            plots.write_plots(out_dir, outcome.figures, scenario.name)
            note = f"event log, figures and plots in {out_dir}"
        else:
            note = (
                f"event log and figures in {out_dir}; no plots without matplotlib "
                "(pip install 'p2pbackup[plots]')"
            )
    if args.json:
        out(json.dumps(summary))
        return EXIT_OK
    for line in report.table(summary):
        out(line)
    if note is not None:
        out(note)
    return EXIT_OK


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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order `p2pbackup --help` lists them.
    for add in (
        _add_init,
        _add_peer,
        _add_friend,
        _add_delegate,
        _add_identity,
        _add_node,
        _add_backup_and_restore,
        _add_upkeep,
        _add_leave,
        _add_recover,
        _add_local_network,
        _add_sim,
        _add_mount,
        _add_shell,
    ):
        add(commands)
    return parser


def _add_mount(commands: _Commands) -> None:
    p = commands.add_parser(
        "mount", help="show the snapshots as a read-only file system at DIR (FUSE)"
    )
    p.add_argument("dir", metavar="DIR", help="an empty directory to mount on")
    p.set_defaults(func=cmd_mount)


async def cmd_mount(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    from p2pbackup.app import operations

    try:
        from p2pbackup.app import mount
    except ImportError:
        raise UsageError(
            "mount needs pyfuse3: pip install 'p2pbackup[mount]' (it builds against "
            "libfuse3: apt-get install libfuse3-dev pkg-config)"
        ) from None
    async with operations.open_repository(home, access="read") as repo:
        await mount.serve_mount(repo, Path(args.dir).absolute(), say=out)
    out("unmounted")
    return EXIT_OK


def _add_shell(commands: _Commands) -> None:
    from p2pbackup.cli.shell import SHELLS

    p = commands.add_parser("completion", help="print a shell completion script")
    p.add_argument(
        "shell",
        choices=SHELLS,
        help="bash: `source <(p2pbackup completion bash)` in ~/.bashrc; zsh: the same in "
        "~/.zshrc after compinit; fish: `p2pbackup completion fish | source` in "
        "~/.config/fish/config.fish",
    )
    p.set_defaults(func=cmd_completion)
    p = commands.add_parser("man", help="print the manual page p2pbackup(1), in roff")
    p.set_defaults(func=cmd_man)


def cmd_completion(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    from p2pbackup.cli.shell import completion_script

    out(completion_script(build_parser(), args.shell).rstrip("\n"))
    return 0


def cmd_man(args: argparse.Namespace, home: Home, out: LineSink) -> int:
    from p2pbackup.cli.shell import manual_page

    out(manual_page(build_parser()).rstrip("\n"))
    return 0


#: Where each ``_add_…`` function below adds its commands (argparse gives
#: the type no public name).
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead of lines (docs/usage.md)"
    )


def _limit_options(p: argparse.ArgumentParser) -> None:
    """``--limit-upload`` and ``--limit-download``, in KiB/s (as restic's)."""
    for way, what in (("upload", "send"), ("download", "read")):
        p.add_argument(
            f"--limit-{way}",
            type=int,
            metavar="KIB",
            help=f"{what} at most KIB KiB/s to and from the peers together "
            "(under `serve`, besides the limits of its config.toml)",
        )


def _addresses_option(p: argparse.ArgumentParser, name: str, help: str) -> None:
    """``--NAME HOST:PORT``, repeatable."""
    p.add_argument(f"--{name}", action="append", metavar="HOST:PORT", help=help)


def _add_init(commands: _Commands) -> None:
    p = commands.add_parser("init", help="create a new home and show its recovery key")
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
    _json_option(p)
    p.set_defaults(func=cmd_init)


def _add_peer(commands: _Commands) -> None:
    peer = commands.add_parser("peer", help="manage peers")
    sub = peer.add_subparsers(dest="peer_command", required=True, metavar="COMMAND")
    p = sub.add_parser("add-dir", help="use a local folder (e.g. an external disk) as a peer")
    p.add_argument("path", metavar="PATH", help="the folder (made a peer folder if it is empty)")
    p.set_defaults(request=requests.PeerAddDirRequest)
    p = sub.add_parser("add", help="use a storage node on the network as a peer")
    p.add_argument("address", metavar="HOST:PORT", help="where the node listens")
    p.add_argument("node_id", metavar="NODE_ID", help="as `p2pbackup id` prints it on that node")
    p.set_defaults(request=requests.PeerAddRequest)
    p = sub.add_parser("list", help="list peers")
    _json_option(p)
    p.set_defaults(request=requests.PeerListRequest)
    p = sub.add_parser("rename", help="give a peer or friend a name to use in lists and commands")
    p.add_argument("id", metavar="PEER", help="its name, id, or a unique prefix of its id")
    p.add_argument("name", metavar="NAME", help="letters, digits, - _ . ('' takes the name away)")
    p.set_defaults(request=requests.PeerRenameRequest)
    p = sub.add_parser("remove", help="rebuild a peer's shards on the other peers, then forget it")
    p.add_argument("id", metavar="ID", help="peer id, or a unique prefix of 8 or more characters")
    p.add_argument(
        "--force",
        action="store_true",
        help="also forget the shards no other peer could take (leaving those packs less redundant)",
    )
    p.set_defaults(request=requests.PeerRemoveRequest)
    p = sub.add_parser(
        "find", help="open mode: find nodes in the DHT that store for anyone (strangers)"
    )
    p.add_argument("--count", type=int, default=8, help="how many to look for (default 8)")
    p.add_argument("--add", action="store_true", help="make the nodes found peers")
    _addresses_option(p, "bootstrap", "DHT entry point")
    _json_option(p)
    p.set_defaults(request=requests.PeerFindRequest)


def _add_friend(commands: _Commands) -> None:
    friend = commands.add_parser("friend", help="manage friends (nodes added with an invite code)")
    sub = friend.add_subparsers(dest="friend_command", required=True, metavar="COMMAND")
    p = sub.add_parser("add", help="add a friend's node from its invite code")
    p.add_argument("code", metavar="CODE", help="as `p2pbackup invite` prints it on that node")
    p.add_argument(
        "--name", metavar="NAME", help="what to call the friend in lists and commands (alice)"
    )
    p.set_defaults(request=requests.FriendAddRequest)
    p = sub.add_parser("list", help="list friends and the shards they hold")
    _json_option(p)
    p.set_defaults(request=requests.FriendListRequest)
    p = sub.add_parser(
        "remove", help="rebuild a friend's shards on the other peers, then forget it"
    )
    p.add_argument("id", metavar="ID", help="node id, or a unique prefix of 8 or more digits")
    p.add_argument(
        "--force",
        action="store_true",
        help="also forget the shards no other peer could take (leaving those packs less redundant)",
    )
    p.set_defaults(request=requests.FriendRemoveRequest)


def _add_delegate(commands: _Commands) -> None:
    delegate = commands.add_parser(
        "delegate",
        help="manage delegates (nodes that keep this home's backups alive while it is away)",
    )
    sub = delegate.add_subparsers(dest="delegate_command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "add", help="let a node peer repair this home's packs; hand it the repair grant now"
    )
    p.add_argument(
        "id", metavar="NODE_ID", help="node id of a friend or node peer, or a unique prefix"
    )
    p.set_defaults(request=requests.DelegateAddRequest)
    p = sub.add_parser("list", help="list delegates and the repair grant each holds")
    _json_option(p)
    p.set_defaults(request=requests.DelegateListRequest)
    p = sub.add_parser(
        "remove", help="tell every node peer to refuse a delegate's certificates, then forget it"
    )
    p.add_argument("id", metavar="NODE_ID", help="node id, or a unique prefix")
    p.set_defaults(request=requests.DelegateRemoveRequest)


def _add_identity(commands: _Commands) -> None:
    """This node as others know it (invite, id), and others as the DHT knows them (lookup)."""
    p = commands.add_parser("invite", help="print this node's invite code for a friend")
    _addresses_option(
        p,
        "address",
        "where friends reach this node (repeatable; default: what `serve` last published)",
    )
    _json_option(p)
    p.set_defaults(func=cmd_invite)
    p = commands.add_parser("lookup", help="find a node's contact record in the DHT")
    p.add_argument("node_id", metavar="NODE_ID", help="the node to find (40 hex digits)")
    _addresses_option(p, "bootstrap", "a DHT node to ask (repeatable)")
    _json_option(p)
    p.set_defaults(func=cmd_lookup)
    p = commands.add_parser("id", help="show this home's node id")
    _json_option(p)
    p.set_defaults(func=cmd_id)


def _add_node(commands: _Commands) -> None:
    """``serve``, and ``status``: what the node and its peers are doing now."""
    p = commands.add_parser("serve", help="store shards for peers (runs until interrupted)")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (default: [::]:47470, every interface of both IP "
        "families; 0.0.0.0:PORT for IPv4 alone; port 0 picks one)",
    )
    p.add_argument("--capacity", metavar="SIZE", help="most space to give all peers (e.g. 200G)")
    p.add_argument("--owner-quota", metavar="SIZE", help="most space to give any one peer")
    _addresses_option(p, "bootstrap", "a DHT node to join through, besides friends (repeatable)")
    _addresses_option(
        p,
        "advertise",
        "an address to publish for this node (repeatable; default: from --listen)",
    )
    p.add_argument(
        "--open",
        action="store_true",
        help="store for any node that asks (within quotas), not only for friends",
    )
    p.add_argument(
        "--no-port-mapping",
        action="store_true",
        help="do not ask the router to forward the port (NAT-PMP/PCP); see docs/nat.md",
    )
    p.add_argument(
        "--via-relays",
        action="store_true",
        help="this node cannot be dialled (behind NAT): be reached through up to two "
        "friends that can from the start, and keep the router's mappings open (without "
        "it, relays are used while no friend can dial the node back)",
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
    p.add_argument(
        "--ui-port",
        type=int,
        metavar="PORT",
        help="the dashboard's port on 127.0.0.1 (default: config.toml's [ui] port, else 47471; "
        "0 when --listen picks its port)",
    )
    p.add_argument("--no-ui", action="store_true", help="run without the web dashboard")
    p.add_argument(
        "--ui-listen",
        metavar="HOST:PORT",
        help="let the dashboard listen elsewhere than 127.0.0.1 (reachable by others on that "
        "network, guarded by its token only; an SSH tunnel is safer: see the user guide)",
    )
    p.set_defaults(func=cmd_serve)
    p = commands.add_parser("ui", help="print the address of the web dashboard, with its token")
    p.add_argument("--no-browser", action="store_true", help="only print it, even on a desktop")
    p.set_defaults(func=cmd_ui)
    alerts = commands.add_parser("alerts", help="alerts by webhook or email ([alerts] in config)")
    sub = alerts.add_subparsers(dest="alerts_command", required=True, metavar="COMMAND")
    p = sub.add_parser("test", help="send a test message to each configured target")
    p.set_defaults(func=cmd_alerts_test)
    p = commands.add_parser("status", help="this node, each peer now, and the health of the data")
    _json_option(p)
    p.set_defaults(request=requests.StatusRequest)


def _add_backup_and_restore(commands: _Commands) -> None:
    p = commands.add_parser("backup", help="back up files and directories")
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files and directories to back up (absolute or relative)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="leave out names (*.tmp, .cache) or absolute paths (/home/me/Downloads) "
        "that match (repeatable)",
    )
    p.add_argument(
        "--exclude-file",
        action="append",
        metavar="FILE",
        help="read exclude patterns from FILE, one a line; # starts a comment (repeatable)",
    )
    p.add_argument(
        "--exclude-if-present",
        action="append",
        metavar="NAME",
        help="leave out every directory that holds a file named NAME, such as CACHEDIR.TAG "
        "(repeatable)",
    )
    p.add_argument(
        "--one-file-system",
        action="store_true",
        help="do not cross into other file systems (mount points) below the paths given",
    )
    p.add_argument(
        "--files-from",
        action="append",
        metavar="FILE",
        help="back up the absolute paths FILE lists, one a line (repeatable)",
    )
    p.add_argument(
        "--tag", action="append", dest="tags", metavar="TAG", help="tag the snapshot (repeatable)"
    )
    p.add_argument(
        "--takeover",
        action="store_true",
        help="make this home the one that writes the root record, when another home "
        "with the same recovery key has written it since (that home's newer snapshots "
        "are dropped)",
    )
    _dry_run_option(p, "say what would be stored: files new and changed, bytes, packs")
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress and no summary: print the snapshot id alone",
    )
    loudness.add_argument(
        "-v", "--verbose", action="store_true", help="a line for each file read, new or changed"
    )
    unchanged = p.add_mutually_exclusive_group()
    unchanged.add_argument(
        "--skip-if-unchanged",
        action="store_true",
        help="make no snapshot when nothing changed since the last one of these paths "
        "(as scheduled backups do)",
    )
    unchanged.add_argument(
        "--force-snapshot",
        action="store_false",
        dest="skip_if_unchanged",
        help="make a snapshot even if nothing changed (the default here)",
    )
    _limit_options(p)
    _json_option(p)
    p.set_defaults(request=requests.BackupRequest)
    p = commands.add_parser("snapshots", help="list snapshots")
    _snapshot_filter_options(p)
    _json_option(p)
    p.set_defaults(request=requests.SnapshotsRequest)
    p = commands.add_parser(
        "stats", help="sizes of snapshots: to restore, as stored, and on which peers"
    )
    p.add_argument(
        "snapshots",
        nargs="*",
        metavar="SNAPSHOT",
        help="id, unique prefix, or 'latest' (default: every snapshot)",
    )
    p.add_argument(
        "--mode",
        default="restore-size",
        choices=("restore-size", "raw-data"),
        help="restore-size: files and bytes to restore (the default); raw-data: the "
        "distinct blobs the snapshots need, before and after compression, and with redundancy",
    )
    p.add_argument(
        "--by-peer",
        action="store_true",
        help="also which peers hold the snapshots' packs: shards and bytes on each",
    )
    _snapshot_filter_options(p)
    _json_option(p)
    p.set_defaults(request=requests.StatsRequest)
    p = commands.add_parser(
        "tag",
        help="change snapshots' tags (each changed snapshot is replaced by one with a new id)",
    )
    p.add_argument(
        "snapshots", nargs="+", metavar="SNAPSHOT", help="id, unique prefix, or 'latest'"
    )
    for option, what in (
        ("add", "add these tags"),
        ("remove", "remove these tags"),
        ("set", "replace every tag by these ('' for none)"),
    ):
        p.add_argument(
            f"--{option}", action="append", metavar="TAG[,TAG]", help=f"{what} (repeatable)"
        )
    _json_option(p)
    p.set_defaults(request=requests.TagRequest)
    p = commands.add_parser("ls", help="list the contents of a snapshot")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="id, unique prefix, or 'latest'")
    p.add_argument(
        "path", nargs="?", metavar="PATH", help="a path inside the snapshot (default: its top)"
    )
    _json_option(p)
    p.set_defaults(request=requests.LsRequest)
    _add_browse(commands)
    p = commands.add_parser("restore", help="restore a snapshot into a directory")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="id, unique prefix, or 'latest'")
    p.add_argument(
        "--target", required=True, metavar="DIR", help="where to restore (made if missing)"
    )
    p.add_argument("--path", metavar="P", help="restore only this path of the snapshot")
    p.add_argument("--overwrite", action="store_true", help="replace existing files that differ")
    p.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="restore only what matches: names (*.jpg) or absolute paths as backed up "
        "(/home/me/docs), with everything under a match (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="leave out what matches, as backup --exclude (repeatable)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="read every file restored back and compare it with the snapshot",
    )
    _limit_options(p)
    _json_option(p)
    p.set_defaults(request=requests.RestoreRequest)


def _snapshot_filter_options(p: argparse.ArgumentParser) -> None:
    """restic's ``--tag``, ``--path``, ``--host`` filters."""
    p.add_argument(
        "--tag",
        action="append",
        metavar="TAG[,TAG]",
        help="only snapshots with all these tags (repeatable: any of the options matches)",
    )
    p.add_argument(
        "--path",
        action="append",
        metavar="PATH",
        help="only snapshots of this path (repeatable: they must have every one)",
    )
    p.add_argument(
        "--host",
        action="append",
        metavar="HOST",
        help="only snapshots made on this host (repeatable: any of them)",
    )


def _add_browse(commands: _Commands) -> None:
    """Looking into snapshots without restoring them."""
    p = commands.add_parser("diff", help="what changed between two snapshots")
    p.add_argument(
        "snapshot1", metavar="SNAPSHOT1", help="the older: id, unique prefix, or 'latest'"
    )
    p.add_argument("snapshot2", metavar="SNAPSHOT2", help="the newer")
    _json_option(p)
    p.set_defaults(request=requests.DiffRequest)
    p = commands.add_parser("find", help="find files by name or path in every snapshot")
    p.add_argument(
        "patterns",
        nargs="+",
        metavar="PATTERN",
        help="a glob on the name (*.jpg) or, with a slash, on the whole path (/home/*/notes.txt)",
    )
    p.add_argument(
        "--snapshot",
        action="append",
        metavar="SNAPSHOT",
        help="look only in this snapshot (repeatable; default: every one)",
    )
    _json_option(p)
    p.set_defaults(request=requests.FindRequest)
    p = commands.add_parser(
        "dump", help="write a file of a snapshot to standard output (a directory as tar)"
    )
    p.add_argument("snapshot", metavar="SNAPSHOT", help="id, unique prefix, or 'latest'")
    p.add_argument("path", metavar="PATH", help="a path in the snapshot ('/' for all of it)")
    p.set_defaults(request=requests.DumpRequest)


def _add_upkeep(commands: _Commands) -> None:
    """Dropping what is no longer wanted, and checking what is kept."""
    _add_forget(commands)
    p = commands.add_parser("prune", help="delete data no snapshot needs")
    _dry_run_option(p, "say what would be deleted and repacked")
    _json_option(p)
    p.set_defaults(request=requests.PruneRequest)
    p = commands.add_parser(
        "repair",
        help="read back every shard now and rebuild what is lost or corrupt on other peers",
    )
    p.add_argument(
        "--grace",
        metavar="DURATION",
        help="how long a peer that does not answer counts as asleep rather than lost "
        "(default 3d; 0: every unreachable peer is lost)",
    )
    p.add_argument(
        "--rate",
        metavar="SIZE",
        help="most bytes a second to move, such as 500K or 2M (default 1M; 'unlimited')",
    )
    p.add_argument(
        "--for",
        dest="owner",
        metavar="OWNER_NODE_ID",
        help="repair another home's packs now, as its delegate (from the grant it handed us)",
    )
    _json_option(p)
    p.set_defaults(request=requests.RepairRequest)
    p = commands.add_parser("check", help="verify the index against the peers")
    p.add_argument(
        "--read-data", action="store_true", help="download and verify every shard and blob"
    )
    _limit_options(p)
    _json_option(p)
    p.set_defaults(request=requests.CheckRequest)


def _add_leave(commands: _Commands) -> None:
    p = commands.add_parser(
        "leave",
        help="delete this home's data on every peer and tell those this node stores for",
    )
    _json_option(p)
    p.set_defaults(request=requests.LeaveRequest)


def _dry_run_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--dry-run", action="store_true", help=f"{what}, and change nothing (here or on peers)"
    )


def _add_forget(commands: _Commands) -> None:
    p = commands.add_parser(
        "forget",
        help="drop snapshots, named or by a policy of what to keep (prune frees their space)",
        description="Forget the snapshots named, or those a policy does not keep. "
        "A policy applies to each group of snapshots apart (by default: the same paths "
        "and tags); a snapshot that any --keep option keeps is kept.",
    )
    p.add_argument(
        "snapshots", nargs="*", metavar="SNAPSHOT", help="id, unique prefix, or 'latest'"
    )
    for unit, what in (
        ("last", "the N newest snapshots"),
        ("hourly", "the newest snapshot of each of the N newest hours that have one"),
        ("daily", "the newest snapshot of each of the N newest days that have one"),
        ("weekly", "the newest snapshot of each of the N newest weeks that have one"),
        ("monthly", "the newest snapshot of each of the N newest months that have one"),
        ("yearly", "the newest snapshot of each of the N newest years that have one"),
    ):
        p.add_argument(f"--keep-{unit}", type=int, metavar="N", help=f"keep {what}")
    p.add_argument(
        "--keep-within",
        metavar="DURATION",
        help="keep the snapshots younger than DURATION, counted back from the newest "
        "(y, m, d, h: 7d, 1y6m)",
    )
    p.add_argument(
        "--keep-tag",
        action="append",
        metavar="TAG[,TAG]",
        help="keep the snapshots that carry these tags (repeatable)",
    )
    p.add_argument(
        "--group-by",
        metavar="KEYS",
        help="group snapshots by any of host,paths,tags ('' for one group; default paths,tags)",
    )
    p.add_argument("--prune", action="store_true", help="prune afterwards")
    _dry_run_option(p, "say what would be forgotten (and pruned)")
    _json_option(p)
    p.set_defaults(request=requests.ForgetRequest)


def _add_recover(commands: _Commands) -> None:
    p = commands.add_parser("recover", help="rebuild a home from the recovery key and the peers")
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
    _addresses_option(
        p,
        "bootstrap",
        "any node of the DHT (repeatable): the home's root pointer there names "
        "the nodes holding its root record",
    )
    p.add_argument(
        "--partial",
        action="store_true",
        help="take what can be read now even if some index packs or snapshots cannot be "
        "(the others are then dropped from the root record on every peer)",
    )
    _json_option(p)
    p.set_defaults(func=cmd_recover)


def _add_local_network(commands: _Commands) -> None:
    """Nodes on this machine, to watch the whole story or to try things on."""
    p = commands.add_parser(
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
    p = commands.add_parser(
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


class _CommandOrScenario(argparse._SubParsersAction):  # type: ignore[type-arg]
    """``sim``'s subcommands, where a first word that names none of them is
    the path of a scenario, run by the subcommand :data:`SIM_SCENARIO` once
    one is registered (``sim durability`` and ``sim path/to/x.toml`` then
    live side by side)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse checks the first word against ``choices`` before it
        # calls the action: let a scenario's path through.
        self.choices = _Subcommands(self._name_parser_map)  # type: ignore[assignment]

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        names = self._name_parser_map
        if values and values[0] not in names and SIM_SCENARIO in names:
            values = [SIM_SCENARIO, *values]
        super().__call__(parser, namespace, values, option_string)


class _Subcommands(Mapping[str, argparse.ArgumentParser]):
    """The subcommands by name, holding any word once a scenario runner is
    registered."""

    def __init__(self, parsers: dict[str, argparse.ArgumentParser]) -> None:
        self._parsers = parsers

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        return self._parsers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsers)

    def __len__(self) -> int:
        return len(self._parsers)

    def __contains__(self, name: object) -> bool:
        return name in self._parsers or SIM_SCENARIO in self._parsers


#: The ``sim`` subcommand that runs a scenario file given in place of a
#: subcommand's name (see :class:`_CommandOrScenario`).
SIM_SCENARIO = "run"


def _add_sim(commands: _Commands) -> None:
    """Simulations: the durability model, its sweeps, and scenarios of real nodes."""
    sim = commands.add_parser(
        "sim", help="simulate: durability of a code, sweeps of parameters, scenarios"
    )
    sub = sim.add_subparsers(
        dest="sim_command", required=True, metavar="COMMAND", action=_CommandOrScenario
    )
    p = sub.add_parser(
        "durability", help="the chance of losing a pack per year, by a Monte Carlo of the network"
    )
    p.add_argument("--shards", required=True, metavar="K/N", help="any K of N shards restore")
    repair = p.add_mutually_exclusive_group()
    repair.add_argument("--no-repair", action="store_true", help="never repair")
    repair.add_argument(
        "--repair-days",
        type=float,
        metavar="T",
        help="days a repair takes from its decision to the rebuilt shards in place",
    )
    p.add_argument(
        "--repair-threshold",
        type=int,
        metavar="R",
        help="repair a pack with fewer than R healthy shards (default: the node's, K+3 at most N)",
    )
    _durability_options(p)
    p.add_argument("--packs", type=int, default=1000, metavar="P", help="packs (default 1000)")
    p.add_argument(
        "--grace-days",
        type=float,
        default=3.0,
        metavar="G",
        help="days an unreachable holder is waited for before its shards count as lost "
        "(default 3, the node's)",
    )
    p.add_argument(
        "--repair-mbps",
        type=float,
        metavar="B",
        help="megabits per second a repair moves, adding its transfer time (default: no limit)",
    )
    p.add_argument(
        "--detect-days",
        type=float,
        default=1.0,
        metavar="A",
        help="days until audits notice a holder gone (default 1)",
    )
    p.set_defaults(func=cmd_sim_durability)

    p = sub.add_parser(
        "sweep", help="the durability model over a grid of parameters, on Dask distributed"
    )
    p.add_argument(
        "--shards", required=True, metavar="K/N,...", help="codes, comma-separated (4/8,6/12)"
    )
    p.add_argument(
        "--repair-threshold",
        type=_number_list(_threshold),
        required=True,
        metavar="R,...",
        help="repair thresholds; 'none' for no repair (those that do not fit a code are skipped)",
    )
    p.add_argument(
        "--grace-days",
        type=_number_list(float),
        default=[3.0],
        metavar="G,...",
        help="grace periods in days (default 3)",
    )
    p.add_argument(
        "--repair-days",
        type=float,
        default=1.0,
        metavar="T",
        help="days a repair takes (default 1)",
    )
    _durability_options(p, lists=True)
    p.add_argument("--packs", type=int, default=1000, metavar="P", help="packs (default 1000)")
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="an existing Dask scheduler (tcp://host:8786); default: a local cluster",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        metavar="W",
        help="processes of the local cluster (default 2)",
    )
    p.set_defaults(func=cmd_sim_sweep)

    p = sub.add_parser(
        SIM_SCENARIO,
        help="run a scenario: real nodes on a simulated network in virtual time "
        "(also `sim SCENARIO.toml`)",
    )
    p.add_argument("scenario", metavar="SCENARIO", help="a scenario file (see simulations/)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed (default: the scenario's)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write the event log (events.jsonl), figures.json and PNG plots (with the extra "
        "'plots') here: a new or empty directory",
    )
    p.add_argument(
        "--small", action="store_true", help="run the scenario's [small] size (as CI does)"
    )
    p.add_argument("--days", type=float, metavar="D", help="virtual days (default: the scenario's)")
    p.add_argument("--nodes", type=int, metavar="N", help="nodes (default: the scenario's)")
    _json_option(p)
    p.set_defaults(func=cmd_sim_run)


def _durability_options(p: argparse.ArgumentParser, *, lists: bool = False) -> None:
    """The options ``sim durability`` and ``sim sweep`` share."""
    p.add_argument(
        "--node-mttf-days",
        type=_number_list(float) if lists else float,
        required=True,
        metavar="D,..." if lists else "D",
        help="mean node lifetime in days (exponential)",
    )
    p.add_argument("--years", type=float, required=True, metavar="Y", help="years simulated")
    p.add_argument("--nodes", type=int, default=1000, metavar="N", help="nodes (default 1000)")
    p.add_argument(
        "--availability",
        type=float,
        default=1.0,
        metavar="A",
        help="share of each day a node is online, 0 to 1 (default 1)",
    )
    p.add_argument("--seed", type=int, default=1, metavar="S", help="random seed (default 1)")
    _json_option(p)


def _tolerate_undecodable_names() -> None:
    """File names that are not UTF-8 reach us as surrogate escapes (PEP 383);
    print them as the bytes they are instead of failing on a strict stdout."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and getattr(sys.stdout, "errors", None) == "strict":
        reconfigure(errors="surrogateescape")


def _request(cls: type[requests.Request], args: argparse.Namespace) -> requests.Request:
    """The request ``args`` ask for: each field from the option of its name
    (a list as a tuple; an option not given, the field's default), and client
    paths made absolute here, where a relative one means what the user meant."""
    values: dict[str, Any] = {}
    for field in attrs.fields(cls):
        value = getattr(args, field.name)
        if value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
        if requests.is_client_path(field):
            value = _absolute(value)
        values[field.name] = value
    return cls(**values)


def _absolute(value: str | tuple[str, ...]) -> str | tuple[str, ...]:
    if isinstance(value, tuple):
        return tuple(os.path.join(os.getcwd(), path) for path in value)
    return os.path.join(os.getcwd(), value)


def _forward(home: Home, request: requests.Request, console: Console) -> Outcome | None:
    """Hand the request to this home's daemon if one runs; None otherwise
    (with a warning when a daemon should have answered)."""
    if os.environ.get("P2PBACKUP_LOCAL") == "1":
        return None
    name = requests.command_name(request)
    if home.control_path.exists():
        sent = ControlRequest(name, requests.encode_arguments(request))
        outcome = trio.run(
            functools.partial(
                control.forward,
                home.control_path,
                sent,
                write=console.out,
                progress=console.progress,
            )
        )
        if outcome is not None:
            return outcome
    problem = _no_daemon(home)
    if problem is not None:
        print(f"p2pbackup: warning: {problem}; running `{name}` in this process", file=sys.stderr)
    return None


def _no_daemon(home: Home) -> str | None:
    """What is wrong when no daemon answered: a ``serve`` that holds the home
    but does not answer, or one that stopped without a clean stop (it leaves
    its control socket); None when no ``serve`` runs and none stopped so."""
    pid = home.serving_pid()
    if pid is not None:
        return (
            f"serve (pid {pid}) does not answer on {home.control_path} "
            f"(still starting? see {home.log_path})"
        )
    if home.control_path.exists():
        return (
            f"the serve of {home.path} stopped unexpectedly (see {home.log_path}): "
            "nothing stores for friends or runs scheduled backups until "
            "`p2pbackup serve` runs again"
        )
    return None


def _terminal(*, shows_progress: bool) -> Console:
    """Lines to stdout; progress in place on stderr, if it is a terminal."""
    progress = terminal_line(sys.stderr) if shows_progress and sys.stderr.isatty() else None
    return Console(functools.partial(print, flush=True), progress)


def _run(args: argparse.Namespace, home: Home) -> Outcome:
    console = _terminal(shows_progress=not getattr(args, "json", False))
    cls: type[requests.Request] | None = getattr(args, "request", None)
    if cls is None:
        func: Callable[[argparse.Namespace, Home, LineSink], Any] = args.func
        if inspect.iscoroutinefunction(func):
            return Outcome(int(trio.run(func, args, home, console.out)))
        return Outcome(int(func(args, home, console.out)))
    request = _request(cls, args)
    if requests.command_name(request) in requests.LOCAL_COMMANDS:
        console = attrs.evolve(console, data=_standard_output_bytes())
        return trio.run(Service(home).run, request, console)
    forwarded = _forward(home, request, console)
    if forwarded is not None:
        return forwarded
    return trio.run(Service(home).run, request, console)


def _standard_output_bytes() -> Callable[[bytes], None]:
    """Writes bytes to standard output (after any text already printed)."""
    sys.stdout.flush()
    stream = sys.stdout.buffer

    def write(data: bytes) -> None:
        stream.write(data)

    return write


def main(argv: Sequence[str] | None = None) -> int:
    _tolerate_undecodable_names()
    args = build_parser().parse_args(argv)
    tune_process()
    home = Home(Path(args.home) if args.home else default_home())
    try:
        with unwrap_single():
            outcome = _run(args, home)
    except BrokenPipeError:
        # The reader went away (`p2pbackup status | head`): stop quietly, as
        # a process killed by SIGPIPE would, without a second error when
        # Python flushes stdout on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (P2PBackupError, OSError) as exc:
        outcome = Outcome(EXIT_ERROR, error_message(exc) or "")
    except KeyboardInterrupt:
        print("p2pbackup: interrupted", file=sys.stderr)
        return 130
    if outcome.error:
        print(f"p2pbackup: error: {outcome.error}", file=sys.stderr)
    return outcome.code
