"""A namespace lab: real routers with real NAT, made with ``ip netns``.

The lab, all in network namespaces of this machine (nothing leaves it)::

    public (11.20.30.0/24, a bridge in namespace "pub")
      ├── the public node's address 11.20.30.100
      ├── router 1: WAN 11.20.30.1, LAN 192.168.1.1, MASQUERADE, miniupnpd
      │     (NAT-PMP/PCP and UPnP on) ── home A 192.168.1.20
      └── router 2: WAN 11.20.30.2, LAN 192.168.2.1, MASQUERADE, no mapping
            ── home B 192.168.2.20

Both routers drop, unanswered, a TCP connection from outside that nothing
on their LAN asked for (as most home routers do).

The public segment is not a documentation range (TEST-NET-3) because
miniupnpd maps nothing when its WAN address is a reserved one; the lab's
namespaces have no link to this machine's own network, so its addresses
never reach a real one.

Each namespace is named with a prefix unique to the lab, so two runs never
meet; :func:`namespace_lab` tears every one of them down afterwards, also
when the test fails. Where namespaces cannot be made (not root, no ``ip``,
no ``iptables``, no ``miniupnpd``) :func:`lab_unavailable` says why in one
line, for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from .cli_helpers import CLI, base_env

PUBLIC_NODE = "11.20.30.100"
ROUTER1_WAN, ROUTER1_LAN, HOME_A = "11.20.30.1", "192.168.1.1", "192.168.1.20"
ROUTER2_WAN, ROUTER2_LAN, HOME_B = "11.20.30.2", "192.168.2.1", "192.168.2.20"

#: The programs the lab runs, as Debian packages them (.ci/run installs them).
NEEDED = ("ip", "iptables", "nft", "miniupnpd")

_MINIUPNPD_CONF = """\
ext_ifname=wan
listening_ip=lan
http_port=0
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=yes
notify_interval=60
clean_ruleset_interval=600
uuid=3e4c2b3a-86f1-4b0a-9a0a-5c4b5e6f7a80
min_lifetime=60
max_lifetime=86400
upnp_table_name=filter
upnp_nat_table_name=filter
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
allow 1024-65535 192.168.1.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""

#: The tables and chains miniupnpd's nftables backend fills in (its own
#: init script, nft_init.sh, does the same with a drop policy).
_MINIUPNPD_NFT = """\
table inet filter {
    chain forward {
        type filter hook forward priority 0; policy accept;
        jump miniupnpd
    }
    chain miniupnpd {
    }
    chain prerouting {
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting_miniupnpd {
    }
}
"""


def lab_unavailable() -> str | None:
    """Why no lab can be made here, in one line; None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [name for name in NEEDED if _which(name) is None]
    if missing:
        return f"the namespace lab needs {', '.join(missing)} (apt-get install miniupnpd iptables)"
    probe = f"p2pb-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@attrs.define
class Lab:
    """A built lab: its namespaces by role, and how to run a command in one."""

    prefix: str
    root: Path
    namespaces: list[str] = attrs.Factory(list)
    processes: list[subprocess.Popen[bytes]] = attrs.Factory(list)

    def ns(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def command(self, role: str, *argv: str | os.PathLike[str]) -> list[str]:
        """``argv`` as run inside the namespace of ``role``."""
        return ["ip", "netns", "exec", self.ns(role), *map(str, argv)]

    def run(self, role: str, *argv: str, check: bool = True) -> str:
        done = subprocess.run(self.command(role, *argv), capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(f"{role}: {' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def cli(self, role: str, home: Path, *args: str | os.PathLike[str]) -> str:
        """A p2pbackup command of ``home``, run inside ``role``'s namespace,
        which must succeed without a traceback; its output."""
        done = subprocess.run(
            self.command(role, *CLI, "--home", home, *args),
            capture_output=True,
            text=True,
            env=base_env(),
            timeout=120,
        )
        assert done.returncode == 0 and "Traceback" not in done.stderr, (done.stdout, done.stderr)
        return done.stdout

    def start(
        self, role: str, *argv: str | os.PathLike[str], env: dict[str, str] | None = None, log: Path
    ) -> subprocess.Popen[bytes]:
        """A process in ``role``'s namespace, its output to ``log``; stopped
        with the lab."""
        with log.open("wb") as out:
            process = subprocess.Popen(
                self.command(role, *argv), stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.processes.append(process)
        return process

    def add_namespace(self, role: str) -> None:
        subprocess.run(["ip", "netns", "add", self.ns(role)], check=True)
        self.namespaces.append(self.ns(role))
        self.run(role, "ip", "link", "set", "lo", "up")

    def link(self, a: str, a_if: str, b: str, b_if: str) -> None:
        """A veth pair: ``a_if`` in ``a``'s namespace, ``b_if`` in ``b``'s."""
        temp_a, temp_b = f"{self.prefix}{a_if}"[:15], f"{self.prefix}x{b_if}"[:15]
        subprocess.run(
            ["ip", "link", "add", temp_a, "type", "veth", "peer", "name", temp_b], check=True
        )
        subprocess.run(["ip", "link", "set", temp_a, "netns", self.ns(a)], check=True)
        subprocess.run(["ip", "link", "set", temp_b, "netns", self.ns(b)], check=True)
        self.run(a, "ip", "link", "set", temp_a, "name", a_if)
        self.run(b, "ip", "link", "set", temp_b, "name", b_if)
        self.run(a, "ip", "link", "set", a_if, "up")
        self.run(b, "ip", "link", "set", b_if, "up")

    def address(self, role: str, interface: str, cidr: str) -> None:
        self.run(role, "ip", "addr", "add", cidr, "dev", interface)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for name in reversed(self.namespaces):
            # Deleting a namespace deletes its veth ends, and their peers.
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def _router(lab: Lab, role: str, wan: str, lan: str, home: str, home_address: str) -> None:
    lab.add_namespace(role)
    lab.add_namespace(home)
    lab.link(role, "wan", "pub", f"to{role}")
    lab.run("pub", "ip", "link", "set", f"to{role}", "master", "br0")
    lab.address(role, "wan", f"{wan}/24")
    lab.link(role, "lan", home, "eth0")
    lab.address(role, "lan", f"{lan}/24")
    lab.address(home, "eth0", f"{home_address}/24")
    lab.run(home, "ip", "route", "add", "default", "via", lan)
    lab.run(role, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    lab.run(role, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
    # Like most home routers, drop (rather than refuse) a connection from
    # outside that nothing on the LAN asked for or had forwarded.
    lab.run(
        role, "iptables", "-A", "INPUT", "-i", "wan", "-p", "tcp",
        "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP",
    )  # fmt: skip


def _start_miniupnpd(lab: Lab) -> None:
    conf = lab.root / "miniupnpd.conf"
    conf.write_text(_MINIUPNPD_CONF)
    rules = lab.root / "miniupnpd.nft"
    rules.write_text(_MINIUPNPD_NFT)
    lab.run("r1", "nft", "-f", str(rules))
    # -d: stay in the foreground and log to stderr (the lab's log file).
    lab.start("r1", "miniupnpd", "-d", "-f", conf, log=lab.root / "miniupnpd.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if ":5351 " in lab.run("r1", "ss", "-uln", check=False):
            return
        time.sleep(0.1)
    raise RuntimeError(f"miniupnpd did not start: {(lab.root / 'miniupnpd.log').read_text()}")


@contextlib.contextmanager
def namespace_lab(root: Path) -> Iterator[Lab]:
    """Build the lab (module docstring), yield it, tear it down."""
    root.mkdir(parents=True, exist_ok=True)
    lab = Lab(prefix=f"p2pb{os.getpid() % 100000}-", root=root)
    try:
        lab.add_namespace("pub")
        lab.run("pub", "ip", "link", "add", "br0", "type", "bridge")
        lab.run("pub", "ip", "link", "set", "br0", "up")
        lab.address("pub", "br0", f"{PUBLIC_NODE}/24")
        _router(lab, "r1", ROUTER1_WAN, ROUTER1_LAN, "homea", HOME_A)
        _router(lab, "r2", ROUTER2_WAN, ROUTER2_LAN, "homeb", HOME_B)
        _start_miniupnpd(lab)
        yield lab
    finally:
        lab.stop()


def wait_for(condition: object, *, timeout: float, what: str, logs: Sequence[Path] = ()) -> None:
    """Poll ``condition()`` until true; fail naming ``what`` and the logs' ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    raise AssertionError(f"{what}: not within {timeout:g} s\n{tails}")
