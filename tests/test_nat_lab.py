"""Homes behind real NAT routers, in network namespaces (tests/netns_lab.py).

Home A sits behind a router running miniupnpd: its ``serve`` maps its port and
the public node, a friend, reaches it at the router's public address. Home B
sits behind a router that maps nothing: its ``serve`` says it is not
reachable and why. Needs root, ``ip``, ``iptables``, ``nft`` and ``miniupnpd``
(.ci/run installs them); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pbackup.app.home import Home

from .cli_helpers import CLI, base_env, cli_ok
from .netns_lab import (
    HOME_A,
    HOME_B,
    PUBLIC_NODE,
    ROUTER1_LAN,
    ROUTER1_WAN,
    ROUTER2_LAN,
    ROUTER2_WAN,
    Lab,
    lab_unavailable,
    namespace_lab,
    wait_for,
)

pytestmark = pytest.mark.slow

PORT = 4001


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with namespace_lab(tmp_path / "lab") as built:
        yield built


def _home(tmp_path: Path, name: str) -> Path:
    home = tmp_path / name
    cli_ok("init", "--shards", "1/2", "--recovery-key-file", tmp_path / f"{name}.key", home=home)
    return home


def _invite(lab: Lab, role: str, home: Path, *addresses: str) -> str:
    options = [item for address in addresses for item in ("--address", address)]
    return lab.cli(role, home, "invite", *options).splitlines()[-1]


def _befriend(lab: Lab, a: tuple[str, Path, str], b: tuple[str, Path, str]) -> None:
    """Each adds the other's invite code, from inside its own namespace."""
    lab.cli(a[0], a[1], "friend", "add", b[2])
    lab.cli(b[0], b[1], "friend", "add", a[2])


def _serve(
    lab: Lab, role: str, home: Path, listen: str, *extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log = home.parent / f"{home.name}-serve.out"
    process = lab.start(
        role,
        *CLI,
        "--home",
        home,
        "serve",
        "--listen",
        listen,
        "--log-level",
        "info",
        *extra,
        env=base_env(),
        log=log,
    )
    return process, log


def _serve_all(
    lab: Lab, public: Path, home_a: Path, home_b: Path
) -> tuple[subprocess.Popen[bytes], Path, subprocess.Popen[bytes], Path, Path]:
    """The public node, then homes A and B joining the DHT through it, each
    listening on every interface with no flag about NAT: the public node's
    process and log, A's, and B's log."""
    public_node, public_log = _serve(lab, "pub", public, f"{PUBLIC_NODE}:{PORT}")
    wait_for(
        lambda: "serving on" in public_log.read_text(),
        timeout=60,
        what="the public node started",
        logs=[public_log],
    )
    bootstrap = ("--bootstrap", f"{PUBLIC_NODE}:{PORT}")
    node_a, log_a = _serve(lab, "homea", home_a, f"0.0.0.0:{PORT}", *bootstrap)
    _, log_b = _serve(lab, "homeb", home_b, f"0.0.0.0:{PORT}", *bootstrap)
    return public_node, public_log, node_a, log_a, log_b


def test_a_mapped_home_is_reached_directly_and_an_unmapped_one_says_why(
    lab: Lab, tmp_path: Path
) -> None:
    public, home_a, home_b = (_home(tmp_path, name) for name in ("public", "a", "b"))
    public_code = _invite(lab, "pub", public, f"{PUBLIC_NODE}:{PORT}")
    code_a = _invite(lab, "homea", home_a, f"{ROUTER1_WAN}:{PORT}", f"{HOME_A}:{PORT}")
    code_b = _invite(lab, "homeb", home_b, f"{HOME_B}:{PORT}")
    _befriend(lab, ("pub", public, public_code), ("homea", home_a, code_a))
    _befriend(lab, ("pub", public, public_code), ("homeb", home_b, code_b))

    _, public_log, node_a, log_a, log_b = _serve_all(lab, public, home_a, home_b)
    logs = [log_a, log_b, public_log, lab.root / "miniupnpd.log"]

    wait_for(
        lambda: f"reachable directly at {ROUTER1_WAN}:{PORT}" in log_a.read_text(),
        timeout=120,
        what="home A reachable at its router's public address",
        logs=logs,
    )
    # The router forwards both protocols; the address went into the contact
    # record, and into what `invite` hands out.
    forwarded = lab.run("r1", "nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd")
    assert f"dnat ip to {HOME_A}:{PORT}" in forwarded
    assert "0x6" in forwarded and "0x11" in forwarded  # TCP and UDP
    assert Home(home_a).read_addresses()[0] == f"{ROUTER1_WAN}:{PORT}"

    wait_for(
        lambda: "not reachable:" in log_b.read_text(),
        timeout=120,
        what="home B reporting itself unreachable",
        logs=logs,
    )
    line_b = next(line for line in log_b.read_text().splitlines() if "not reachable:" in line)
    assert f"the router at {ROUTER2_LAN} did not answer NAT-PMP, PCP or UPnP" in line_b
    assert f"no friend could dial {HOME_B}:{PORT}" in line_b
    assert "relays will be used" in line_b
    assert ROUTER1_LAN not in line_b

    # status, asked of the running node, says the same.
    status_a = cli_ok("status", home=home_a).stdout
    assert f"reachable directly at {ROUTER1_WAN}:{PORT}" in status_a

    # A clean stop deletes the mappings.
    node_a.send_signal(signal.SIGTERM)
    node_a.wait(timeout=30)
    wait_for(
        lambda: (
            f"dnat ip to {HOME_A}"
            not in lab.run("r1", "nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd")
        ),
        timeout=30,
        what="home A's mappings deleted when it stopped",
        logs=logs,
    )


_UPNP_MAP = """
import trio
from p2pbackup.net.network import TcpNetwork
from p2pbackup.net.natpmp import Transport
from p2pbackup.net.portmap import UpnpMapper

async def main():
    mapper = UpnpMapper(TcpNetwork())
    mapping = await mapper.map(Transport.TCP, 4002)
    print("mapped", mapping.external, mapper.location)
    input()
    await mapper.unmap(mapping)
    print("unmapped")

trio.run(main)
"""


def test_upnp_finds_the_router_by_ssdp_and_maps_a_port(lab: Lab) -> None:
    process = subprocess.Popen(
        lab.command("homea", *CLI[:1], "-c", _UPNP_MAP),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=base_env(),
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        line = process.stdout.readline()
        assert line.startswith(f"mapped {ROUTER1_WAN}:4002 http://{ROUTER1_LAN}:"), (
            line + (process.stderr.read() if process.poll() is not None else "")  # type: ignore[union-attr]
        )
        rules = lab.run("r1", "nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd")
        assert f"dnat ip to {HOME_A}:4002" in rules
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.stdout.readline() == "unmapped\n"
        rules = lab.run("r1", "nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd")
        assert f"{HOME_A}:4002" not in rules
    finally:
        process.kill()
        process.wait()


def _tree(root: Path, owner: str) -> dict[str, bytes]:
    """A small tree whose names and contents are easy to look for."""
    root.mkdir(parents=True)
    files = {
        f"{owner}-diary-secret.txt": f"{owner} wrote this plaintext marker".encode() * 50,
        f"{owner}-photo.raw": os.urandom(300_000),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def _holds_none_of(directory: Path, needles: list[bytes]) -> list[str]:
    """Where under ``directory`` any of ``needles`` appears (names or bytes)."""
    found = []
    for path in directory.rglob("*"):
        for needle in needles:
            if needle in os.fsencode(path.name) or (path.is_file() and needle in path.read_bytes()):
                found.append(f"{path}: {needle[:20]!r}")
    return found


def test_two_homes_behind_nat_back_up_to_each_other_and_survive_the_public_friend(
    lab: Lab, tmp_path: Path
) -> None:
    """Home A maps its port and is dialled directly; home B maps nothing, finds
    that no friend can dial it, and is reached only through relays (the
    public friend, and A). Both back up
    to each other and to the public friend; the public friend dies; both
    restore exactly. The public friend, a relay for both, kept none of
    their plaintext or file names."""
    public, home_a, home_b = (_home(tmp_path, name) for name in ("public", "a", "b"))
    public_code = _invite(lab, "pub", public, f"{PUBLIC_NODE}:{PORT}")
    code_a = _invite(lab, "homea", home_a, f"{ROUTER1_WAN}:{PORT}")
    code_b = _invite(lab, "homeb", home_b, f"{HOME_B}:{PORT}")
    _befriend(lab, ("pub", public, public_code), ("homea", home_a, code_a))
    _befriend(lab, ("pub", public, public_code), ("homeb", home_b, code_b))
    _befriend(lab, ("homea", home_a, code_a), ("homeb", home_b, code_b))

    # B is not told it sits behind NAT: its failed dial-back turns its relays on.
    public_node, public_log, _, log_a, log_b = _serve_all(lab, public, home_a, home_b)
    logs = [log_a, log_b, public_log]
    wait_for(
        lambda: f"reachable directly at {ROUTER1_WAN}:{PORT}" in log_a.read_text(),
        timeout=120,
        what="home A reachable at its router's public address",
        logs=logs,
    )
    wait_for(
        lambda: log_b.read_text().count("reachable through relay") >= 2,
        timeout=120,
        what="home B holding reservations at both reachable friends",
        logs=logs,
    )

    trees = {"a": _tree(tmp_path / "src-a", "alice"), "b": _tree(tmp_path / "src-b", "bob")}
    snapshot = {}
    for name, role, home in (("a", "homea", home_a), ("b", "homeb", home_b)):
        out = lab.cli(role, home, "backup", str(tmp_path / f"src-{name}"))
        snapshot[name] = out.splitlines()[-1]

    public_node.kill()
    public_node.wait(timeout=30)
    for name, role, home in (("a", "homea", home_a), ("b", "homeb", home_b)):
        target = tmp_path / f"out-{name}"
        lab.cli(role, home, "restore", snapshot[name], "--target", str(target))
        restored = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
        assert restored == trees[name], sorted(restored)

    needles = [name.encode() for tree in trees.values() for name in tree] + [b"plaintext marker"]
    assert _holds_none_of(public, needles) == []
    assert not [n for n in needles if n in public_log.read_bytes()]


def _peer(lab: Lab, home: Path, node_id: str) -> dict[str, object]:
    """What home A's ``status --json`` says of the peer ``node_id``."""
    peers = json.loads(lab.cli("homea", home, "status", "--json"))["peers"]
    return next((p for p in peers if p["peer_id"] == node_id), {})


def _backup_when_b_answers(lab: Lab, home: Path, source: Path) -> None:
    """Home A's backup, asked again (at most seven more times) when B was
    slower to answer its probe than the probe's patience: a node found
    through a DHT look-up and a relay often takes longer than the two
    seconds a probe waits once the other peers have answered (the look-up
    asks DHT nodes behind NAT first, and waits for them)."""
    for _ in range(8):
        done = subprocess.run(
            lab.command("homea", *CLI, "--home", home, "backup", source),
            capture_output=True,
            text=True,
            env=base_env(),
            timeout=120,
        )
        assert "Traceback" not in done.stderr, done.stderr
        if done.returncode == 0:
            return
        assert "offline" in done.stderr, done.stderr
    raise AssertionError(f"home A's backup never found B answering: {done.stderr}")


def _relayed_bytes(lab: Lab, public: Path) -> int:
    """Bytes the public node relayed since it started, from its status."""
    report = json.loads(lab.cli("pub", public, "status", "--json"))["relay"]
    return sum(int(friend["bytes_from"]) for friend in report["friends"])


def test_two_homes_behind_nat_without_mappings_move_to_a_direct_connection(
    lab: Lab, tmp_path: Path
) -> None:
    """Neither home maps a port (``--no-port-mapping``), so each is reached
    only through the public friend, a relay. When A backs up to B, the
    session through the relay moves to a direct connection between the two
    routers' public addresses (a simultaneous open through MASQUERADE), and
    the backup's bytes go that way: the relay carries only the handshakes."""
    public, home_a, home_b = (_home(tmp_path, name) for name in ("public", "a", "b"))
    public_code = _invite(lab, "pub", public, f"{PUBLIC_NODE}:{PORT}")
    code_a = _invite(lab, "homea", home_a, f"{HOME_A}:{PORT}")
    code_b = _invite(lab, "homeb", home_b, f"{HOME_B}:{PORT}")
    _befriend(lab, ("pub", public, public_code), ("homea", home_a, code_a))
    _befriend(lab, ("pub", public, public_code), ("homeb", home_b, code_b))
    _befriend(lab, ("homea", home_a, code_a), ("homeb", home_b, code_b))

    _, public_log = _serve(lab, "pub", public, f"{PUBLIC_NODE}:{PORT}")
    wait_for(
        lambda: "serving on" in public_log.read_text(),
        timeout=60,
        what="the public node started",
        logs=[public_log],
    )
    home_options = ("--no-port-mapping", "--via-relays", "--bootstrap", f"{PUBLIC_NODE}:{PORT}")
    _, log_a = _serve(lab, "homea", home_a, f"0.0.0.0:{PORT}", *home_options)
    _, log_b = _serve(lab, "homeb", home_b, f"0.0.0.0:{PORT}", *home_options)
    logs = [log_a, log_b, public_log]
    for log in (log_a, log_b):
        wait_for(
            lambda log=log: "reachable through relay" in log.read_text(),  # type: ignore[misc]
            timeout=120,
            what=f"{log.name} holding a reservation at the public friend",
            logs=logs,
        )

    # A finds B's relays in the DHT once B has published them; its status
    # then shows B answering (through the relay, upgraded at once).
    b_id = json.loads(lab.cli("homeb", home_b, "status", "--json"))["node"]["node_id"]
    wait_for(
        lambda: _peer(lab, home_a, b_id).get("route") is not None,
        timeout=120,
        what="home A reaching home B through the public friend",
        logs=logs,
    )
    tree = _tree(tmp_path / "src-a", "alice")
    size = sum(len(data) for data in tree.values())
    before = _relayed_bytes(lab, public)
    _backup_when_b_answers(lab, home_a, tmp_path / "src-a")
    relayed = _relayed_bytes(lab, public) - before
    print(f"relayed during the backup: {relayed} bytes; the tree: {size} bytes")

    # Each side says it moved, and to the other's router.
    assert f"a direct connection with {ROUTER2_WAN}:{PORT}" in log_a.read_text(), logs
    wait_for(
        lambda: f"a direct connection with {ROUTER1_WAN}:{PORT}" in log_b.read_text(),
        timeout=10,
        what="home B on the direct connection",
        logs=logs,
    )
    # B holds a shard of A's backup; the relay carried a small part of it.
    stored = sum(p.stat().st_size for p in (home_b / "hosted").rglob("*") if p.is_file())
    assert stored > size // 2, stored
    assert relayed < size // 10, (relayed, size)
    # status says so too (once its probe finds B within its patience).
    wait_for(
        lambda: _peer(lab, home_a, b_id).get("direct_address") == f"{ROUTER2_WAN}:{PORT}",
        timeout=60,
        what="home A's status showing B reached directly after the relay",
        logs=logs,
    )
