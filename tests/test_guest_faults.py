"""The untrusted guest in the real three processes: ``vreplica run --guest-fault KIND``.

After five good frames the guest driver breaks one ring rule (guestproc/faults.py). The
device must report it with QEMU's message, set NEEDS_RESET and raise the config interrupt,
and stay up; the driver resets the device and carries on, so every datagram but the one
that carried the fault reaches the host.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from replica import run_summary

from guestproc.faults import FAULTS

pytestmark = pytest.mark.usefixtures("no_leftovers")

PACKETS = 8


def run(tmp_path: Path, *args: str, timeout: float = 60) -> dict:
    return run_summary(tmp_path, "--packets", str(PACKETS), "--timeout", "30", *args,
                       timeout=timeout)


def check_recovered(s: dict, expect: str) -> None:
    fault = s["guest_fault"]
    assert fault["committed"] and fault["at_frame"] == 6
    assert len(s["device_errors"]) == 1 and s["device_errors"][0].startswith(expect), \
        s["device_errors"]
    assert s["guest_resets"] == 1
    assert s["sent"] == PACKETS and s["delivered"] == PACKETS - 1  # all but the faulty frame
    # re-registered at the new DRIVER_OK: RX, TX and the control queue
    assert s["ioeventfds"] == 3
    assert s["irqfds"] == 0  # virtio-net in QEMU sends its MSIs itself (KVM_SIGNAL_MSI)


def fault_device(kind: str) -> list[str]:
    """The device a fault needs: its registers' transport, a packed ring on a modern one."""
    f = FAULTS[kind]
    if f.ring == "packed":
        return ["--transport", f.transport or "modern", "--ring", "packed"]
    return ["--transport", f.transport] if f.transport else []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", FAULTS)
def test_fault_is_reported_and_the_guest_recovers(tmp_path: Path, kind: str) -> None:
    """Each kind on the device it needs: the legacy default, the modern transport for the
    modern registers' faults (queue-addr, queue-enable), a packed ring for the packed ones."""
    s = run(tmp_path, "--guest-fault", kind, *fault_device(kind))
    check_recovered(s, FAULTS[kind].expect)
    assert s["host"]["bad_payloads"] == 0 and s["host"]["duplicates"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, options", [
    ("head", ["--vectors", "0"]),  # the config interrupt on the INTx line, ISR bit 1
    ("loop", ["--vectors", "1"]),
    ("next", ["--ioeventfd", "off"]),
    ("indirect-nested", ["--any-layout", "off"]),
    ("tx-writable", ["--queues", "2"]),
    ("zero-len", ["--mrg-rxbuf", "on", "--tx", "timer"]),
], ids=["intx", "msix-shared", "no-ioeventfd", "any-layout-off", "multiqueue", "mrg-timer"])
def test_recovery_under_other_machine_options(tmp_path: Path, kind: str,
                                              options: list[str]) -> None:
    s = run(tmp_path, "--guest-fault", kind, *options)
    assert s["guest_fault"]["committed"] and s["guest_resets"] == 1
    assert len(s["device_errors"]) == 1
    assert s["device_errors"][0].startswith(FAULTS[kind].expect)
    assert s["delivered"] == PACKETS - 1


@pytest.mark.timeout(60)
def test_indirect_fault_without_the_feature(tmp_path: Path) -> None:
    s = run(tmp_path, "--guest-fault", "indirect-size", "--indirect-desc", "off")
    assert s["guest_fault"]["expect"] == "Indirect descriptors not negotiated"
    check_recovered(s, "Indirect descriptors not negotiated")


@pytest.mark.timeout(60)
def test_indirect_descriptors_carry_a_normal_run(tmp_path: Path) -> None:
    """Without ANY_LAYOUT each TX frame is header + data, two buffers: one indirect table."""
    s = run(tmp_path, "--any-layout", "off")
    assert s["delivered"] == PACKETS and not s["device_errors"]
    assert s["indirect_descs"] >= PACKETS
    s = run(tmp_path, "--any-layout", "off", "--indirect-desc", "off")
    assert s["delivered"] == PACKETS and s["indirect_descs"] == 0


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vreplica.cli", "run", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(30)
def test_guest_fault_list_and_bad_kinds() -> None:
    p = cli("--guest-fault", "list")
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(FAULTS)
    assert all(len(line.split(None, 1)) == 2 for line in lines)
    for args in (["--guest-fault", "nonsense"], ["--guest-fault", "head", "--mode", "echo"],
                 ["--guest-fault", "head", "--packets", "5"]):
        p = cli(*args)
        assert p.returncode == 2 and p.stdout == ""
        assert len(p.stderr.strip().splitlines()) == 1 and "--guest-fault" in p.stderr
