"""DPDK's testpmd as a real vhost-user peer: started in interactive mode under pexpect, on one
forwarding core, in a process group of its own that ``stop`` always kills."""

from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path

import pexpect

PROMPT = "testpmd> "


class DpdkTestpmd:
    """``dpdk-testpmd --vdev net_vhost0,iface=SOCK,queues=N -- -i --forward-mode=MODE``: the
    vhost library as the back end (a server on SOCK unless ``client``)."""

    def __init__(self, sock: Path, queues: int = 1, mode: str = "icmpecho",
                 client: bool = False, timeout: float = 30.0) -> None:
        vdev = f"net_vhost0,iface={sock},queues={queues}" + (",client=1" if client else "")
        self.prefix = f"vufe{uuid.uuid4().hex[:10]}"
        args = ["--no-huge", "-m", "1024", "--no-pci", "-l", "0-1",
                f"--file-prefix={self.prefix}", "--vdev", vdev, "--",
                "-i", "--nb-cores=1", f"--rxq={queues}", f"--txq={queues}",
                "--total-num-mbufs=4096", f"--forward-mode={mode}"]
        # pexpect's child leads a session (and so a process group) of its own
        self.child = pexpect.spawn("dpdk-testpmd", args, encoding="utf-8", timeout=timeout)
        self.child.expect_exact(PROMPT)

    def cmd(self, line: str) -> str:
        self.child.sendline(line)
        self.child.expect_exact(PROMPT)
        return self.child.before

    def start(self) -> None:
        self.cmd("start")

    def port_stats(self) -> dict[str, int]:
        """Port 0's RX-packets and TX-packets (``show port stats 0``)."""
        out = self.cmd("show port stats 0")
        rx = re.search(r"RX-packets:\s+(\d+)", out)
        tx = re.search(r"TX-packets:\s+(\d+)", out)
        assert rx and tx, out
        return {"rx": int(rx.group(1)), "tx": int(tx.group(1))}

    def stream_stats(self, queues: int) -> dict[str, list[int]]:
        """Stop forwarding; per queue, the packets its stream received and sent (testpmd's
        'Forward Stats for RX Port= 0/Queue= N' blocks; a stream that moved nothing has none)."""
        out = self.cmd("stop")
        rx, tx = [0] * queues, [0] * queues
        for q, r, t in re.findall(r"RX Port=\s*0/Queue=\s*(\d+) -> TX Port=\s*0/Queue=\s*\d+"
                                  r"\s*-+\s*RX-packets:\s*(\d+)\s+TX-packets:\s*(\d+)", out):
            rx[int(q)], tx[int(q)] = int(r), int(t)
        return {"rx": rx, "tx": tx, "text": out}  # type: ignore[dict-item]

    def stop(self) -> None:
        """quit if it answers, then kill its process group whatever it did."""
        try:
            if self.child.isalive():
                self.child.sendline("quit")
                self.child.expect(pexpect.EOF, timeout=10)
        except (pexpect.TIMEOUT, pexpect.EOF, OSError):
            pass
        finally:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.child.close(force=True)
            for leftover in Path("/var/run/dpdk").glob(f"{self.prefix}*"):
                _rmtree(leftover)


def _rmtree(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        for c in p.iterdir():
            _rmtree(c)
        p.rmdir()
    else:
        p.unlink(missing_ok=True)
