"""A local network for newcomers and tests: N befriended nodes on 127.0.0.1.

Nouns:

* **devnet** — a directory ``D`` holding N homes (``D/node-01`` …), each
  served by its own ``p2pbackup serve`` child process on a loopback port, all
  friends of each other both ways, in one Kademlia DHT (every node joins
  through the first). :func:`open_devnet` starts one and stops it on the way
  out; :func:`run_devnet` is the ``p2pbackup devnet`` command around it.
* **devnet node** — :class:`DevnetNode`: one home and its process — name,
  node id, address, invite code, pid, and the files beside the home: its
  recovery key (``D/node-01.key``, mode 0600) and its log (``D/node-01.log``,
  the child's stderr).
* **restart** — ``devnet --dir D`` where an earlier devnet left its homes:
  they are started again (no new homes, no new keys), and each records
  where its friends listen now (:func:`_readdress_all`); their snapshots,
  friends and shards are as they were.
* **unexpected exit** — a child that exits without being asked (by
  :meth:`Devnet.stop`, :meth:`Devnet.kill` or the devnet closing).
  :func:`open_devnet` then raises :class:`DevnetNodeDied` into its body, so
  nothing goes on as if the network were whole.

The children run in sessions of their own: a Ctrl-C at the terminal reaches
only the devnet process, which stops them in order (SIGTERM, then SIGKILL
after :data:`STOP_TIMEOUT`) instead of each one racing to exit by itself. The
price: a devnet killed with SIGKILL leaves its nodes running (their pids are
in the homes' ``serve.lock``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import attrs
import trio

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.errors import P2PBackupError, UsageError
from p2pbackup.model import PEER_KIND_NODE, PeerRecord, RepositoryConfig
from p2pbackup.nurseries import unwrap_single
from p2pbackup.stores.durable import write_private_file

#: How a child node is run: this Python, this package (as tests/cli_helpers does).
NODE_COMMAND = (sys.executable, "-m", "p2pbackup.cli")
DEFAULT_NODES = 6
#: Each home's friends are the other N - 1 nodes, and a backup needs three
#: peers (placement.MIN_PEERS): fewer nodes make a network where nobody can
#: back up.
MIN_NODES = 4
#: Every node is a Python process (~60 MB) and befriending is N × (N - 1)
#: handshakes; past this a devnet is a load test, not a playground.
MAX_NODES = 50
#: Seconds a child has to print ``serving on``.
START_TIMEOUT = 30.0
#: Seconds between SIGTERM and SIGKILL when stopping a child.
STOP_TIMEOUT = 10.0
#: Lines of a child's log quoted when it dies.
LOG_TAIL = 12


class DevnetNodeDied(P2PBackupError):
    """A devnet node's process exited without being asked to, or never started."""

    def __init__(self, node: str, pid: int, returncode: int | None, log: Path, what: str) -> None:
        how = describe_exit(returncode)
        super().__init__(f"{node} (pid {pid}) {what} ({how}); its log is {log}")
        self.node = node
        self.pid = pid
        self.returncode = returncode
        self.log = log

    def log_tail(self) -> list[str]:
        """The last lines the node wrote on stderr."""
        return read_tail(self.log, LOG_TAIL)


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def read_tail(path: Path, count: int) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-count:]


@attrs.frozen
class DevnetNode:
    """One node of a devnet, as it started."""

    #: 0-based position in :attr:`Devnet.nodes` (the name counts from 1).
    index: int
    name: str
    home: Home
    key_file: Path
    log_file: Path
    node_id: str
    #: ``127.0.0.1:PORT``: TCP (storage) and UDP (DHT).
    address: str
    invite: str
    pid: int


@attrs.define(eq=False)
class _Child:
    """A running child and what the devnet knows about it."""

    name: str
    home: Home
    log_file: Path
    process: trio.Process
    #: Set before the devnet signals it: its exit is then not a failure.
    expected_exit: bool = False
    stdout: collections.deque[str] = attrs.Factory(lambda: collections.deque(maxlen=LOG_TAIL))


@attrs.define(eq=False)
class Devnet:
    """A running devnet: its nodes, and stopping or killing them one by one."""

    root: Path
    nodes: list[DevnetNode] = attrs.Factory(list)
    #: What befriending left to say (a friend not reached at once).
    warnings: list[str] = attrs.Factory(list)
    #: Told when a node dies once the devnet is up; None: the death is an error.
    on_death: Callable[[DevnetNodeDied], None] | None = None
    #: Whether every node started and befriended the others.
    up: bool = False
    #: Whether its homes are an earlier devnet's, started again.
    restarted: bool = False
    _children: dict[int, _Child] = attrs.Factory(dict)

    def running(self, index: int) -> bool:
        return self._children[index].process.returncode is None

    def returncode(self, index: int) -> int | None:
        return self._children[index].process.returncode

    async def kill(self, index: int) -> int:
        """SIGKILL node ``index`` (a machine that dies); returns its exit status."""
        child = self._children[index]
        child.expected_exit = True
        _signal(child.process, signal.SIGKILL)
        return await child.process.wait()

    async def stop(self, index: int, timeout: float = STOP_TIMEOUT) -> int:
        """Stop node ``index`` politely (SIGTERM), by force after ``timeout``
        seconds; returns its exit status."""
        child = self._children[index]
        child.expected_exit = True
        _signal(child.process, signal.SIGTERM)
        with trio.move_on_after(timeout):
            return await child.process.wait()
        _signal(child.process, signal.SIGKILL)
        return await child.process.wait()

    async def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every node still running, all at once."""
        for child in self._children.values():
            child.expected_exit = True
        async with trio.open_nursery() as nursery:
            for index, child in self._children.items():
                if child.process.returncode is None:
                    nursery.start_soon(functools.partial(self.stop, index, timeout))


def _signal(process: trio.Process, signum: int) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)


def node_name(number: int) -> str:
    """``node-01`` for the first node: names sort as numbers up to 99."""
    return f"node-{number:02}"


def check_node_count(count: int) -> None:
    if count < MIN_NODES:
        raise UsageError(
            f"--nodes {count}: a devnet needs at least {MIN_NODES} nodes, since each home's "
            f"friends are the other nodes and a backup needs at least 3 of them"
        )
    if count > MAX_NODES:
        raise UsageError(f"--nodes {count}: at most {MAX_NODES} nodes (each is a process)")


def _earlier_homes(root: Path, count: int) -> bool:
    """Whether ``root`` holds the ``count`` homes of an earlier devnet, to be
    started again (True), or nothing of one (False); UsageError for anything
    between, naming what is there."""
    names = [node_name(number) for number in range(1, count + 1)]
    homes = [name for name in names if Home(root / name).exists()]
    if not homes:
        _check_free(root, count)
        return False
    more = root / node_name(count + 1)
    if len(homes) == count and not Home(more).exists():
        return True
    found = sum(1 for path in root.glob("node-*") if Home(path).exists())
    raise UsageError(
        f"{root} holds {found} homes of an earlier devnet, not {count}: run "
        f"`devnet --dir {root} --nodes {found}` to start them again, or give --dir a new "
        "or empty directory"
    )


def _check_free(root: Path, count: int) -> None:
    for number in range(1, count + 1):
        for path in (
            root / node_name(number),
            root / f"{node_name(number)}.key",
            root / f"{node_name(number)}.log",
        ):
            if path.exists() or path.is_symlink():
                raise UsageError(
                    f"{path} already exists: give --dir a new or empty directory "
                    "(a devnet starts with new homes)"
                )


@contextlib.asynccontextmanager
async def open_devnet(
    root: Path,
    count: int = DEFAULT_NODES,
    *,
    config: RepositoryConfig | None = None,
    serve_args: Sequence[str] = (),
    on_death: Callable[[DevnetNodeDied], None] | None = None,
) -> AsyncIterator[Devnet]:
    """Start a devnet of ``count`` homes under ``root`` — new ones, or the
    homes an earlier devnet left there, started again (:attr:`Devnet.restarted`);
    stop it on exit.

    ``config`` is every home's (default :func:`operations.default_config`);
    ``serve_args`` go to every ``serve`` (e.g. ``--capacity``). If a node
    exits unexpectedly while starting, or later without ``on_death``, the
    body is cancelled and :class:`DevnetNodeDied` raised; with ``on_death``
    a node that dies once the devnet is up is reported there and the others
    go on (a machine that dies is what a devnet is for). On any exit every
    node still running is stopped.
    """
    check_node_count(count)
    root = root.absolute()
    root.mkdir(parents=True, exist_ok=True)
    restarted = _earlier_homes(root, count)
    devnet = Devnet(root, on_death=on_death, restarted=restarted)
    if restarted:
        homes = [Home(root / node_name(number)) for number in range(1, count + 1)]
    else:
        homes = [_init_home(root, number, config) for number in range(1, count + 1)]
    try:
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                await _start_all(devnet, homes, list(serve_args), nursery)
                if restarted:
                    await _readdress_all(devnet)
                else:
                    await _befriend_all(devnet)
                devnet.up = True
                yield devnet
                await devnet.stop_all()
                nursery.cancel_scope.cancel()  # the watchers
    finally:
        with trio.CancelScope(shield=True):
            await devnet.stop_all()


def _init_home(root: Path, number: int, config: RepositoryConfig | None) -> Home:
    home = Home(root / node_name(number))
    key_file = root / f"{node_name(number)}.key"
    operations.init_home(
        home,
        config if config is not None else operations.default_config(),
        deliver_key=lambda key: write_private_file(key_file, (key + "\n").encode()),
    )
    return home


async def _start_all(
    devnet: Devnet, homes: list[Home], serve_args: list[str], nursery: trio.Nursery
) -> None:
    """The first node, then the others at once, joining the DHT through it."""
    first = await _start_node(devnet, 0, homes[0], serve_args, nursery)
    rest = [*serve_args, "--bootstrap", first.address]
    started: dict[int, DevnetNode] = {0: first}

    async def start(index: int) -> None:
        started[index] = await _start_node(devnet, index, homes[index], rest, nursery)

    async with trio.open_nursery() as starting:
        for index in range(1, len(homes)):
            starting.start_soon(start, index)
    devnet.nodes.extend(started[index] for index in range(len(homes)))


async def _start_node(
    devnet: Devnet, index: int, home: Home, serve_args: list[str], nursery: trio.Nursery
) -> DevnetNode:
    name = node_name(index + 1)
    log_file = devnet.root / f"{name}.log"
    command = [*NODE_COMMAND, "--home", os.fspath(home.path), "serve"]
    command += ["--listen", "127.0.0.1:0", *serve_args]
    with open(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    child = _Child(name, home, log_file, process)
    # Registered at once, so that a failure from here on stops it too.
    devnet._children[index] = child
    assert process.stdout is not None
    lines = _LineReader(process.stdout)
    address = ""
    with trio.move_on_after(START_TIMEOUT):
        while (line := await lines.next()) is not None:
            child.stdout.append(line)
            if line.startswith("serving on "):
                address = line.removeprefix("serving on ").strip()
                break
    if not address:
        child.expected_exit = True
        _signal(process, signal.SIGKILL)
        code = await process.wait()
        what = "did not start" if code != -signal.SIGKILL else "did not start in time"
        raise DevnetNodeDied(name, process.pid, code, log_file, what)
    nursery.start_soon(_drain, child, lines)
    nursery.start_soon(_watch, devnet, child)
    return DevnetNode(
        index=index,
        name=name,
        home=home,
        key_file=devnet.root / f"{name}.key",
        log_file=log_file,
        node_id=home.node_id().hex(),
        address=address,
        invite=operations.make_invite(home),
        pid=process.pid,
    )


class _LineReader:
    """Lines of text from a child's stdout, one at a time."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str | None:
        """The next line without its newline; None at the end of the stream."""
        while b"\n" not in self._buffer:
            data = await self._stream.receive_some()
            if not data:
                rest, self._buffer = self._buffer, b""
                return rest.decode(errors="replace") if rest else None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace")


async def _drain(child: _Child, lines: _LineReader) -> None:
    # Read on, or a chatty child would block on a full pipe.
    while (line := await lines.next()) is not None:
        child.stdout.append(line)


async def _watch(devnet: Devnet, child: _Child) -> None:
    code = await child.process.wait()
    if child.expected_exit:
        return
    died = DevnetNodeDied(
        child.name, child.process.pid, code, child.log_file, "exited unexpectedly"
    )
    if devnet.on_death is None or not devnet.up:
        raise died
    child.expected_exit = True  # reported: not a failure any more
    devnet.on_death(died)


async def _befriend_all(devnet: Devnet) -> None:
    """Every node adds every other as a friend, in-process, one home at a time
    each (the home's lock), all homes at once."""

    async def befriend(node: DevnetNode) -> None:
        async with operations.open_repository(node.home) as repo:
            for other in devnet.nodes:
                if other.index == node.index:
                    continue
                added = await operations.add_friend(repo, other.invite)
                devnet.warnings.extend(f"{node.name}: {w}" for w in added.warnings)

    async with trio.open_nursery() as nursery:
        for node in devnet.nodes:
            nursery.start_soon(befriend, node)


async def _readdress_all(devnet: Devnet) -> None:
    """Homes started again listen on new ports: each records where its
    friends are now, as friend and as peer (their ids and keys are as before)."""

    async def readdress(node: DevnetNode) -> None:
        async with operations.open_repository(node.home) as repo:
            with repo.index.transaction():
                for other in devnet.nodes:
                    if other.index == node.index:
                        continue
                    repo.index.set_friend_addresses(bytes.fromhex(other.node_id), [other.address])
                    repo.index.add_peer(PeerRecord(other.node_id, PEER_KIND_NODE, other.address))

    async with trio.open_nursery() as nursery:
        for node in devnet.nodes:
            nursery.start_soon(readdress, node)


# -- the `p2pbackup devnet` command ------------------------------------------------------


def out(line: str) -> None:
    print(line, flush=True)


def err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def program_name(argv0: str | None = None) -> str:
    """How to run p2pbackup again, as the user can type it: ``p2pbackup`` when
    that is what PATH finds, else the path that was run, else ``python -m``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if Path(argv0).name == "p2pbackup":
        found = shutil.which("p2pbackup")
        if found is not None and Path(found).resolve() == Path(argv0).resolve():
            return "p2pbackup"
        return shlex.quote(os.path.abspath(argv0))
    return f"{shlex.quote(sys.executable)} -m p2pbackup.cli"


def usage_lines(devnet: Devnet, program: str) -> list[str]:
    """What ``p2pbackup devnet`` prints once the nodes run: each node and how to use it."""
    lines = []
    for node in devnet.nodes:
        home = shlex.quote(os.fspath(node.home.path))
        lines += [
            f"{node.name}  node {node.node_id}  at {node.address}  (pid {node.pid})",
            f"    {program} --home {home} backup PATH",
        ]
    first = shlex.quote(os.fspath(devnet.nodes[0].home.path)) if devnet.nodes else "HOME"
    lines += [
        "",
        "every other command works the same way: `snapshots`, `restore latest --target DIR`,",
        f"`friend list`, `status`, `invite`; or `export P2PBACKUP_HOME={first}`",
        "and leave out --home",
    ]
    return lines


async def run_devnet(
    root: Path | None,
    count: int,
    *,
    config: RepositoryConfig | None = None,
    program: str | None = None,
) -> int:
    """``p2pbackup devnet``: start, show, wait for a signal, stop. Exit status.

    ``config`` is every home's (``--shards``); its n must fit the friends a
    home has (``count - 1``), so the code asked for is the code used.
    """
    check_node_count(count)
    if config is not None and config.n > count - 1:
        raise UsageError(
            f"--shards {config.k}/{config.n}: each home has {count - 1} friends to hold "
            f"a pack's {config.n} shards; run --nodes {config.n + 1} or more"
        )
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="p2pbackup-devnet-"))
    root = root.absolute()
    program = program if program is not None else program_name()
    running: list[Devnet] = []
    stop = trio.Event()
    # Open before any child starts: a Ctrl-C while starting stops them too.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def until_signal() -> None:
                async for signum in signals:
                    out(f"{signal.Signals(signum).name}: stopping every node")
                    stop.set()
                    if not running:
                        nursery.cancel_scope.cancel()  # still starting
                    return

            nursery.start_soon(until_signal)
            reported: set[str] = set()

            def report_death(error: DevnetNodeDied) -> None:
                reported.add(error.node)
                err(f"{error}; the other nodes go on")
                for line in error.log_tail()[-3:]:
                    err(f"    {line}")

            try:
                async with open_devnet(root, count, config=config, on_death=report_death) as devnet:
                    running.append(devnet)
                    chosen = config if config is not None else operations.default_config()
                    if devnet.restarted:
                        out(
                            f"devnet of {count} nodes in {root}, started again: the homes "
                            "an earlier devnet left there, friends as before"
                        )
                    else:
                        out(
                            f"devnet of {count} nodes in {root}, every node a friend of "
                            f"every other; each home {chosen.k}-of-{chosen.n}"
                        )
                    out(f"recovery keys in {root}/node-NN.key (mode 0600), logs in node-NN.log")
                    for warning in devnet.warnings:
                        out(f"warning: {warning}")
                    out("")
                    for line in usage_lines(devnet, program):
                        out(line)
                    out("")
                    out(
                        "running; Ctrl-C stops every node "
                        "(kill one to try a machine that dies: the others go on)"
                    )
                    await stop.wait()
            except DevnetNodeDied as died:
                err(f"p2pbackup: error: {died}")
                tail = died.log_tail()
                if tail:
                    err(f"last lines of {died.log}:")
                    for line in tail:
                        err(f"    {line}")
                err("stopped the other nodes")
                return 1
            finally:
                nursery.cancel_scope.cancel()
    if running:
        devnet = running[0]
        for index, node in enumerate(devnet.nodes):
            code = devnet.returncode(index)
            if code != 0 and node.name not in reported:
                out(f"{node.name} (pid {node.pid}) did not stop cleanly ({describe_exit(code)})")
    out(f"stopped; the homes stay in {root}")
    return 0
