"""An emulated network for the parameter-server benchmarks: network namespaces joined by veth pairs, shaped with tc.

`EmulatedNetwork(hosts, link)` creates `hosts` network namespaces, each with one veth
interface (``lsn<i>``, address ``10.213.0.<i+1>/24``) whose other end sits on a bridge in a
private hub namespace, and shapes every host's outgoing traffic with netem (`delay` one way
and `rate`): one shaped egress per direction, so the round trip is twice the delay. Where the
kernel has no netem (`sch_netem`) but has tbf, the rate is shaped with tbf and no delay is
added; `delay_applied` says which, and the benchmarks print it next to the figures. The addresses exist only
inside these namespaces: nothing reaches the host's own network or any other machine.
`run(i, cmd)` starts a command inside host `i` (`ip netns exec`). Everything is removed
on `close()` (also on failure and at interpreter exit); `available()` says whether this
machine allows it (root, `ip`, `tc`, netem), with the reason when it does not.

Links are written "10gbit:50us" (rate, one-way delay), as tc spells them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess

SUBNET = "10.213.0"
DEFAULT_LINKS = ("10gbit:50us", "1gbit:200us")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def available() -> tuple[bool, str]:
    """(whether namespaces with netem can be made here, why not)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` is missing (apt-get install iproute2)"
    try:
        net = EmulatedNetwork(1, DEFAULT_LINKS[0])
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else exc
        return False, f"cannot create a shaped namespace: {detail}"
    net.close()
    return True, ""


_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}


def rate_bits(rate: str) -> float:
    for unit in ("kbit", "mbit", "gbit", "bit"):
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * _UNITS[unit]
    raise ValueError(f"a rate is a number with kbit, mbit or gbit, found {rate!r}")


def parse_link(link: str) -> tuple[str, str]:
    rate, _, delay = link.partition(":")
    if not rate or not delay:
        raise ValueError(f"a link is RATE:DELAY as tc writes them, e.g. 10gbit:50us; found {link!r}")
    return rate, delay


class EmulatedNetwork:
    def __init__(self, hosts: int, link: str):
        self.rate, self.delay = parse_link(link)
        self.link = link
        tag = f"{os.getpid() % 100000:05d}"
        self.hub = f"ls{tag}hub"
        self.names = [f"ls{tag}h{i}" for i in range(hosts)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
        self._made: list[str] = []
        self._closed = False
        self.delay_applied = True
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.addresses)):
            _ip("netns", "add", ns)
            self._made.append(ns)
            outer, inner = f"{ns[2:7]}o{i}", f"lsn{i}"
            # Made inside the hub, then one end moved: no interface ever appears in the host's namespace.
            _ip("-n", self.hub, "link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("-n", self.hub, "link", "set", inner, "netns", ns)
            _ip("-n", self.hub, "link", "set", outer, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self._shape(ns, inner)

    def _shape(self, ns: str, dev: str) -> None:
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root"]
        if self.delay_applied:
            done = subprocess.run([*tc, "netem", "delay", self.delay, "rate", self.rate, "limit", "100000"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return
            self.delay_applied = False  # no netem in this kernel: shape the rate only
        # tbf needs a bucket of at least one timer tick of traffic; 4 ms of it, and at most 20 ms queued.
        burst = max(64 * 1024, int(rate_bits(self.rate) / 8 * 0.004))
        subprocess.run([*tc, "tbf", "rate", self.rate, "burst", str(burst), "latency", "20ms"], check=True,
                       capture_output=True, text=True)

    def describe(self) -> str:
        return f"{self.rate}, {self.delay} one way" if self.delay_applied else \
            f"{self.rate} (tbf; no delay: this kernel has no netem)"

    def interface(self, i: int) -> str:
        return f"lsn{i}"

    def prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program inside host `i`."""
        return ["ip", "netns", "exec", self.names[i]]

    def run(self, i: int, cmd: list[str], **popen) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix(i), *cmd], **popen)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ns in reversed(self._made):  # deleting a namespace deletes its interfaces and qdiscs
            _ip("netns", "del", ns, check=False)
        self._made = []

    def __enter__(self) -> EmulatedNetwork:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
