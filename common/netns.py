"""The run's own network namespace (``ip netns``), the tap device in it, and entering it
(setns(2)) from a thread.

Not part of the replicated system: what libvirt does around a ``-netdev tap`` guest. The
namespace is ``vnr-<run id>``, a bind mount under /run/netns as ``ip netns add`` makes it;
inside it a persistent tap ``tap0`` (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) carries the host end of
the link, 10.0.2.2/24, and loopback is up. Nothing is routed out: the namespace has no other
device. Deleting the namespace (unmounting it) removes the tap with it once the last process
or socket inside is gone.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "vnr-"
NETNS_RE = re.compile(r"vnr-([0-9a-f]{8,32})")
TAP_NAME = "tap0"
HOST_ADDR = "10.0.2.2"
GUEST_ADDR = "10.0.2.15"
PREFIX_LEN = 24
CLONE_NEWNET = 0x40000000
MNT_DETACH = 2
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21

_libc = ctypes.CDLL(None, use_errno=True)


def netns_name(rid: str) -> str:
    return f"{NETNS_PREFIX}{rid}"


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def privilege_problem() -> str | None:
    """Why this process cannot make a namespace with a tap in it (None: it can)."""
    try:
        status = Path("/proc/self/status").read_text()
        cap_eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore
    except (OSError, AttributeError):
        cap_eff = 0
    if not cap_eff >> CAP_NET_ADMIN & 1 or not cap_eff >> CAP_SYS_ADMIN & 1:
        return "needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run as root) to make a network namespace"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    return None


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block's thread in namespace ``name`` (sockets and taps made there stay
    there), then return it to the namespace it was in."""
    old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        fd = os.open(netns_path(name), os.O_RDONLY)
        try:
            setns(fd)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            setns(old)
    finally:
        os.close(old)


def enter(name: str) -> None:
    """Move the calling thread into namespace ``name`` for good (threads it starts later
    follow it)."""
    fd = os.open(netns_path(name), os.O_RDONLY)
    try:
        setns(fd)
    finally:
        os.close(fd)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")


def _in_netns(name: str, script: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", name, "sh", "-c", script], capture_output=True,
                       text=True, check=False)
    if r.returncode:
        raise OSError(f"in {name}: {script}: {r.stderr.strip() or r.returncode}")


def create(rid: str, backpressure_rate: str | None = None, multi_queue: bool = False) -> str:
    """Make the run's namespace and its tap (persistent, vnet header on), give the host end
    its address and bring the links up; returns the namespace's name.

    With ``backpressure_rate`` (a tc rate such as ``2mbit``) the host end is not the tap
    but a veth behind a bridge, and a token-bucket qdisc on the bridge's veth port drains
    the guest's frames at that rate: frames waiting in it are charged to the tap's socket,
    so a small TUNSETSNDBUF makes the tap's write would-block (EAGAIN) until they go.
    ``multi_queue``: the tap takes one file per queue pair (IFF_MULTI_QUEUE).
    """
    name = netns_name(rid)
    _ip("netns", "add", name)
    n = ("-n", name)
    _ip(*n, "link", "set", "lo", "up")
    _ip(*n, "tuntap", "add", "dev", TAP_NAME, "mode", "tap", "vnet_hdr",
        *(["multi_queue"] if multi_queue else []))
    if backpressure_rate is None:
        _ip(*n, "addr", "add", f"{HOST_ADDR}/{PREFIX_LEN}", "dev", TAP_NAME)
    else:
        _ip(*n, "link", "add", "br0", "type", "bridge")
        _ip(*n, "link", "add", "vport", "type", "veth", "peer", "name", "host0")
        _ip(*n, "link", "set", TAP_NAME, "master", "br0")
        _ip(*n, "link", "set", "vport", "master", "br0")
        _ip(*n, "addr", "add", f"{HOST_ADDR}/{PREFIX_LEN}", "dev", "host0")
        _ip(*n, "link", "set", "br0", "arp", "off", "up")  # only host0 answers for 10.0.2.2
        _ip(*n, "link", "set", "vport", "up")
        _ip(*n, "link", "set", "host0", "up")
        # bridged IPv4 bypasses iptables here (br_netfilter's hook would orphan the frames
        # from the tap's socket), then the qdisc that drains them slowly
        _in_netns(name, "for f in /proc/sys/net/bridge/bridge-nf-call-ip*tables; do "
                        "[ -e $f ] && echo 0 > $f; done; tc qdisc add dev vport root tbf "
                        f"rate {backpressure_rate} burst 4k limit 4m")
    _ip(*n, "link", "set", TAP_NAME, "up")
    return name


def delete(name: str) -> bool:
    """``ip netns delete``: unmount and unlink the namespace's file. The namespace (and the
    tap in it) goes when the last process or socket in it does. False if there was none."""
    path = netns_path(name)
    if not path.exists():
        return False
    _libc.umount2(str(path).encode(), MNT_DETACH)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def run_namespaces() -> dict[str, Path]:
    """run id -> namespace file, for every namespace named as a run's."""
    out = {}
    for p in NETNS_DIR.glob(NETNS_PREFIX + "*") if NETNS_DIR.is_dir() else ():
        m = NETNS_RE.fullmatch(p.name)
        if m:
            out[m.group(1)] = p
    return out


def wait_gone(name: str, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while netns_path(name).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not netns_path(name).exists()
