"""The monitors of a running replica: what they show agrees with the run, stop/step/cont hold
and move each process's loop, -S holds the guest, pdb debugs a process on a terminal, and
a held run ends cleanly with quit.

Each run lives under a runs root of this module's own (VREPLICA_RUNS), so ``attach`` finds it
without --run and other sessions' runs stay out of the way.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import psutil
import pytest
from replica import ROLES, Replica

from common.monitor.client import MonitorConnection, query
from common.monitor.commands import MonitorError
from common.monitor.monitor import socket_path
from vreplica.run.summary import sent_line

pytestmark = pytest.mark.usefixtures("no_leftovers")

HDR_LEN = 10  # virtio_net_hdr without MRG_RXBUF
UDP_FRAME = 14 + 20 + 8  # Ethernet, IPv4, UDP headers


@pytest.fixture(scope="module")
def held(runs_root: Path) -> Iterator[Replica]:
    """One finished run kept up with --hold, shared by the tests that only look."""
    r = Replica(runs_root, "--hold", "--packets", "300", "--size", "64")
    try:
        r.wait_program_done()
        r.wait_quiet()
        yield r
        r.quit()
    finally:
        r.close()


def tx_queue(vqs: list[dict]) -> dict:
    return next(v for v in vqs if v["index"] == 1)


# -- what the monitors show ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_queue_status_agrees_with_guest_and_packets(held: Replica) -> None:
    """QEMU's view of the TX ring (QMP's VirtQueueStatus) is the driver's, and counts the sends."""
    tx = held.q("qemu", "info virtio-queue-status 1")
    out = tx_queue(held.q("guest", "info virtqueues"))
    netdev = held.q("guest", "info netdev")
    assert tx["name"] == "virtio-net" and tx["queue-index"] == 1
    assert tx["vring-num"] == tx["vring-num-default"] == out["num"] == 256
    assert (tx["vring-desc"], tx["vring-avail"], tx["vring-used"]) == \
        (out["desc"], out["avail"], out["used"])
    assert tx["last-avail-idx"] == tx["shadow-avail-idx"] == out["avail_idx_shadow"] == \
        out["avail_idx"]
    assert tx["used-idx"] == out["last_used_idx"] == out["used_idx"] == tx["last-avail-idx"]
    assert tx["inuse"] == 0 and out["num_free"] == out["num"] and not out["broken"]
    assert tx["signalled-used-valid"] is True
    frames = netdev["stats"]["tx_packets"]
    assert tx["used-idx"] == frames
    assert 300 <= frames <= 302  # the datagrams, and the guest's ARP request for 10.0.2.2
    stats = held.q("qemu", "info stats")
    assert stats["queues"]["TX(q1)"]["pops"] == frames
    assert held.q("guest", "info status")["program"] == "done"
    human = held.attach("qemu", "-c", "info virtio-queue-status 1").stdout
    assert f"used_idx:             {frames}" in human
    assert f"desc:         0x{out['desc']:016x}" in human


@pytest.mark.timeout(60)
def test_xp_shows_the_tx_descriptors_the_driver_wrote(held: Replica) -> None:
    tx = held.q("qemu", "info virtio-queue-status 1")
    num = tx["vring-num"]
    dump = held.q("qemu", f"xp /{2 * num}g {tx['vring-desc']:#x}")
    assert dump["size"] == 8 and len(dump["values"]) == 2 * num
    descs = []
    for i in range(num):
        addr, word = dump["values"][2 * i], dump["values"][2 * i + 1]
        descs.append((addr, word & 0xFFFFFFFF, (word >> 32) & 0xFFFF, word >> 48))
    ram_size = held.q("qemu", "info status")["ram"]["size"]
    udp = HDR_LEN + UDP_FRAME + 64
    arp = HDR_LEN + 14 + 28
    # the heads the driver published last (the avail ring) name what it wrote
    avail_idx = tx["last-avail-idx"]
    ring = held.q("qemu", f"xp /{num}uh {tx['vring-avail'] + 4}")["values"]
    heads = {ring[i % num] for i in range(max(0, avail_idx - num), avail_idx)}
    assert heads
    for h in heads:
        addr, length, flags, _ = descs[h]
        assert 0 < addr < ram_size and flags == 0 and length in (udp, arp), descs[h]
    assert sum(descs[h][1] == udp for h in heads) >= len(heads) - 2
    # the element QEMU decodes at an avail index is the descriptor xp shows
    el = held.q("qemu", "info virtio-queue-element 1 5")
    addr, length, flags, _ = descs[el["index"]]
    assert el["descs"] == [{"addr": addr, "len": length, "flags": []}]
    assert el["avail"]["ring"] == el["index"]
    # the guest reads the same bytes, and the frame carries one of the run's datagrams
    assert held.q("guest", f"x /2g {tx['vring-desc'] + 16 * el['index']}")["values"] == \
        dump["values"][2 * el["index"] : 2 * el["index"] + 2]
    if length == udp:
        seq = held.q("qemu", f"xp /8b {addr + HDR_LEN + UDP_FRAME}")["values"]
        assert 0 <= int.from_bytes(bytes(seq), "big") < 300
    text = held.attach("qemu", "-c", f"xp /2xg {tx['vring-desc']:#x}").stdout
    assert text.startswith(f"{tx['vring-desc']:016x}: 0x{descs[0][0]:016x}")


@pytest.mark.timeout(60)
def test_memory_dump_formats_and_bounds(held: Replica) -> None:
    tx = held.q("qemu", "info virtio-queue-status 1")
    avail = tx["vring-avail"]
    w = held.q("qemu", f"xp /2xh {avail}")["values"]
    assert w[1] == tx["last-avail-idx"]
    assert held.attach("qemu", "-c", f"xp /2uh {avail}").stdout.split()[1:] == \
        [str(v) for v in w]
    size = held.q("qemu", "info status")["ram"]["size"]
    r = held.attach("qemu", "-c", f"xp /4xg {size - 8}")
    assert r.returncode == 1 and "Cannot access memory" in r.stderr
    r = held.attach("guest", "-c", "x /1i 0x1000")
    assert r.returncode == 1 and "instructions" in r.stderr


@pytest.mark.timeout(60)
def test_info_commands_answer(held: Replica) -> None:
    assert held.q("qemu", "info virtio") == [
        {"path": "/machine/peripheral-anon/device[0]/virtio-backend", "name": "virtio-net"}]
    st = held.q("qemu", "info virtio-status")
    assert "VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready" in st["status"]["statuses"]
    assert "VIRTIO_RING_F_EVENT_IDX: Used & avail. event fields enabled" in \
        st["guest-features"]["transports"]
    net = held.q("qemu", "info network")
    assert [c["name"] for c in net["clients"]] == ["virtio-net-pci.0", "n0"]
    assert net["slirp"]["stats"]["udp_sent"] >= 300
    bhs = held.q("qemu", "info bh")["bhs"]
    tx_bh = next(b for b in bhs if b["callback"] == "virtio_net_tx_bh")
    assert tx_bh["runs"] > 0 and "BH_DELETED" not in tx_bh["flags"]
    handlers = held.q("qemu", "info iohandlers")["handlers"]
    assert {h["name"] for h in handlers} >= {"ioeventfd:TX(q1)", "ioeventfd:RX(q0)"}
    kvm = held.q("kvm", "info ioeventfd")
    assert any(e["bus"] == "pio" and e["datamatch"] == 1 and e["signals"] > 0 for e in kvm)
    assert held.q("kvm", "info irqfd")["irqfds"] == []  # virtio-net in QEMU sets none
    info = held.q("kvm", "info kvm")
    assert info["vcpu"]["signal_msis"] > 0 and info["eois"] > 0
    names = [c["name"] for c in held.q("guest", "help")]
    assert {"send", "x", "info virtqueues", "info netdev", "pdb", "step"} <= set(names)
    assert held.q("qemu", "trace-event virtqueue_* on") == {}
    ev = {e["name"]: e["state"] for e in held.q("qemu", "info trace-events virtqueue_*")}
    assert ev["virtqueue_pop"] == "enabled"
    held.q("qemu", "trace-event virtqueue_* off")
    with pytest.raises(MonitorError, match="unknown command"):
        held.q("kvm", "info nothing")


@pytest.mark.timeout(60)
def test_sockets_private_and_ps_lists_the_run(held: Replica) -> None:
    assert stat.S_IMODE(held.rundir.stat().st_mode) == 0o700
    for role in ROLES:
        st = socket_path(held.rundir, role).stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    ps = subprocess.run([sys.executable, "-m", "vreplica.cli", "ps", "--json"], env=held.env,
                        capture_output=True, text=True, timeout=30)
    runs = json.loads(ps.stdout)["runs"]
    [run] = [r for r in runs if r["run"] == held.cfg.rid]
    rows = {p["role"]: p for p in run["processes"]}
    assert set(rows) == set(ROLES)
    for role, p in rows.items():
        proc = psutil.Process(p["pid"])
        assert f"{role}proc" in proc.cmdline() and proc.ppid() == held.proc.pid
        assert p["state"] == "running" and p["rss_bytes"] > 0 and p["cpu_s"] >= 0
        assert p["ctx_voluntary"] + p["ctx_involuntary"] > 0
    text = subprocess.run([sys.executable, "-m", "vreplica.cli", "ps"], env=held.env,
                          capture_output=True, text=True, timeout=30).stdout
    assert text.splitlines()[0].split()[:4] == ["RUN", "ROLE", "PID", "STATE"]
    assert sum(held.cfg.rid in line for line in text.splitlines()) == 3


@pytest.mark.timeout(60)
def test_commands_answer_while_the_loops_are_blocked(held: Replica) -> None:
    """The guest stopped (and idle): QEMU's vCPU thread waits in KVM_RUN and KVM's vcpu
    thread for the guest, yet every monitor answers (its own threads serve it)."""
    held.q("guest", "stop")
    try:
        vcpu = held.q("qemu", "info status")["threads"]["CPU 0/KVM"]
        assert vcpu["state"] == "running" and "kvm_vcpu_ioctl_run" in vcpu["where"]
        for role in ROLES:
            with MonitorConnection(socket_path(held.rundir, role)) as c:
                pid = c.execute("info status")["pid"]
                assert all(c.execute("info status")["pid"] == pid for _ in range(20))
        assert query(held.rundir, "qemu", "info virtio-queue-status 1")["queue-index"] == 1
    finally:
        held.q("guest", "cont")


@pytest.mark.timeout(60)
def test_attach_one_command_text_and_json(held: Replica) -> None:
    r = held.attach("qemu", "-c", "info status", pick=False)  # the root's only run
    assert r.returncode == 0 and r.stdout.startswith("VM status: running")
    assert f"name=/vnr.{held.cfg.rid}.ram, size=16777216" in r.stdout
    r = held.attach("guest", "--run", held.cfg.rid[:6], "--json", "-c", "info netdev",
                    pick=False)
    assert r.returncode == 0 and json.loads(r.stdout)["return"]["name"] == "eth0"
    r = held.attach("kvm", "-c", "bogus")
    assert r.returncode == 1 and "unknown command: 'bogus'" in r.stderr
    r = held.attach("kvm", "--run", "ffffffff", "-c", "info kvm", pick=False)
    assert r.returncode == 1 and "no running replica" in r.stderr


# -- pdb on a terminal --------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("role, where", [("qemu", "main_loop.py"), ("kvm", "kvm_vcpu_block"),
                                         ("guest", "_vmexit")])
def test_pdb_on_a_pty_shows_the_stack_and_c_resumes(held: Replica, role: str,
                                                     where: str) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "vreplica.cli", "attach", role, "--run",
                                           held.cfg.rid], env=held.env,
                          encoding="utf-8", timeout=15, dimensions=(40, 200))
    try:
        prompt = rf"\({role}\) "
        child.expect(prompt)
        child.sendline("pdb")
        child.expect(r"\(Pdb\) ")
        assert held.q(role, "info status")["status"] == "debug"
        child.sendline("where")
        child.expect(r"\(Pdb\) ")
        assert where in child.before and f"{role}proc" in child.before
        child.sendline("p 6 * 7")
        child.expect(r"42\r?\n")
        child.expect(r"\(Pdb\) ")
        child.sendline("c")
        child.expect(prompt)
        assert held.q(role, "info status")["status"] == "running"
        child.sendline("info status")
        child.expect("VM status: running")
        child.expect(prompt)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    if role == "qemu":  # the main loop goes on after the debugger
        before = held.q("qemu", "info stats")["main_loop_iterations"]
        held.q("guest", "send 5")
        held.wait_for(lambda: held.q("qemu", "info stats")["main_loop_iterations"] > before,
                      10, "the main loop")


# -- stop / step / cont -------------------------------------------------------------------------


STEP_THREAD = {"qemu": "main-loop", "kvm": "vcpu0", "guest": "vCPU 0"}


def counters(r: Replica, role: str) -> tuple:
    if role == "guest":
        s = r.q("guest", "info stats")
        return s["vm_exits"], s["netdev"]["stats"]["tx_packets"]
    if role == "kvm":
        v = r.q("kvm", "info kvm")["vcpu"]
        return v["exits"], v["io_exits"], v["halt_exits"]
    s = r.q("qemu", "info stats")
    return s["main_loop_iterations"], s["queues"]["TX(q1)"]["pops"], s["kvm_run_exits"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("role", ROLES)
def test_stop_freezes_step_advances_one_iteration_cont_resumes(
        replica: Callable[..., Replica], role: str) -> None:
    r = replica("--hold", "--packets", "20")
    r.wait_program_done()
    assert "queued" in r.q("guest", "send 2000000")
    r.wait_for(lambda: r.q("guest", "info stats")["sent_by_monitor"] > 1000, 20, "traffic")
    a = counters(r, role)
    r.wait_for(lambda: counters(r, role) != a, 10, f"{role}'s counters to move")

    stopped = r.q(role, "stop")
    assert stopped["status"] == "paused"
    loop = STEP_THREAD[role]
    r.wait_parked(role)
    frozen = counters(r, role)  # every thread that moves them is held at its safe point
    r.wait_parked(role)
    assert counters(r, role) == frozen, f"{role} moved while stopped"

    step = r.q(role, "step")
    assert step["thread"] == loop
    assert step["iterations"] == 1 and step["completed"] is True
    assert isinstance(step["events"], list)
    r.wait_parked(role)  # the step's iteration is over and its thread held again
    after = counters(r, role)
    if role == "qemu":
        assert after[0] == frozen[0] + 1  # one main_loop_wait
        assert any(e["name"] == "main_loop_wait" for e in step["events"])
    elif role == "kvm":
        assert after[0] == frozen[0] + 1  # one VM exit handled
        names = [e["name"] for e in step["events"]]
        assert "kvm_entry" in names and "kvm_exit" in names
    else:
        assert after[0] - frozen[0] in (0, 1)  # up to the next exit: at most one
    assert r.q(role, "info status")["status"] == "paused"
    r.wait_parked(role)
    assert counters(r, role) == after

    assert r.q(role, "cont")["status"] == "running"
    r.wait_for(lambda: counters(r, role) != after, 10, f"{role} to run again")
    with pytest.raises(MonitorError, match="running"):
        r.q(role, "step")
    r.quit()


@pytest.mark.timeout(90)
def test_stop_gets_a_halted_vcpu_out_of_kvm_run_with_a_signal(
        replica: Callable[..., Replica]) -> None:
    """qemu_cpu_kick: SIG_IPI ends the halted vCPU's block in KVM (no interrupt needed), KVM_RUN
    returns KVM_EXIT_INTR and the vCPU thread parks; the vCPU stays halted, and after cont
    the next KVM_RUN blocks again until the guest has work."""
    r = replica("--hold", "--packets", "20")
    r.wait_program_done()
    kvm = r.wait_quiet()
    exits = r.q("qemu", "info stats")["kvm_run_exits"]
    assert r.q("qemu", "stop")["status"] == "paused"
    r.wait_for(lambda: r.q("qemu", "info status")["threads"]["CPU 0/KVM"]["state"] == "parked",
               10, "the vCPU thread at its stop point")
    after = r.q("kvm", "info kvm")
    assert after["vcpu"]["signal_exits"] == kvm["vcpu"]["signal_exits"] + 1
    assert after["vcpu"]["exits"] == kvm["vcpu"]["exits"]  # the guest never ran
    assert after["userspace_exits"]["KVM_EXIT_INTR"] == kvm["userspace_exits"]["KVM_EXIT_INTR"] + 1
    assert r.q("kvm", "info vcpu")["mp_state"] == "halted"
    got = r.q("qemu", "info stats")["kvm_run_exits"]
    assert got["KVM_EXIT_INTR"] == exits["KVM_EXIT_INTR"] + 1
    assert r.q("qemu", "cont")["status"] == "running"
    assert "queued" in r.q("guest", "send 10")
    r.wait_for(lambda: r.q("guest", "info stats")["sent_by_monitor"] >= 10, 20, "the guest")
    s = r.quit()
    assert s["delivered"] >= 30


# -- -S and the end of a held run ---------------------------------------------------------------


@pytest.mark.timeout(90)
def test_wait_attach_holds_the_guest_until_cont(replica: Callable[..., Replica]) -> None:
    r = replica("--wait-attach", "--hold", "--packets", "20")
    st = r.q("qemu", "info status")
    assert st["status"] == "prelaunch" and st["running"] is False
    assert st["threads"]["CPU 0/KVM"]["state"] == "parked"
    assert r.attach("qemu", "-c", "info status").stdout.startswith(
        "VM status: paused (prelaunch)")
    # the vCPU thread is parked before its first KVM_RUN: nothing can have run
    assert r.q("guest", "info status")["program"] == "not started"
    assert r.q("guest", "info status")["vm_exits"] == 0
    assert r.q("kvm", "info kvm")["vcpu"]["exits"] == 0
    assert r.q("qemu", "info stats")["kvm_run_exits"] == {
        k: 0 for k in r.q("qemu", "info stats")["kvm_run_exits"]}
    assert r.q("qemu", "cont")["status"] == "running"
    r.wait_program_done()
    assert r.q("guest", "info netdev")["stats"]["tx_packets"] >= 20
    s = r.quit()
    assert s["sent"] == 20 and s["delivered"] >= 20


@pytest.mark.timeout(90)
def test_info_kvm_agrees_with_the_summary(replica: Callable[..., Replica]) -> None:
    r = replica("--hold", "--packets", "100")
    r.wait_program_done()
    kvm = r.wait_quiet()
    assert kvm["destroyed"] is False
    s = r.quit()
    assert s["exits"] == kvm["vcpu"]
    assert s["userspace_exits"] == {k: n for k, n in kvm["userspace_exits"].items() if n}
    assert s["interrupts_injected"] == kvm["vcpu"]["irq_injections"]
    assert s["sent"] == 100


@pytest.mark.timeout(90)
def test_monitor_sends_count_in_the_summary(replica: Callable[..., Replica]) -> None:
    """Datagrams the guest sent on the monitor's ``send`` are in the summary's ``sent``, and
    said to be the monitor's."""
    r = replica("--hold", "--packets", "20")
    r.wait_program_done()
    assert "queued" in r.q("guest", "send 30")
    r.wait_for(lambda: r.q("guest", "info status")["pending_sends"] == 0
               and r.q("guest", "info status")["sent_by_monitor"] == 30, 20, "the sends")
    s = r.quit()
    assert s["sent"] == 50 and s["sent_by_monitor"] == 30
    assert "(30 by the monitor's send)" in sent_line(s)


@pytest.mark.timeout(60)
def test_ctrl_c_ends_a_held_run_with_its_summary(replica: Callable[..., Replica]) -> None:
    r = replica("--hold", "--packets", "10")
    r.wait_program_done()
    r.proc.send_signal(signal.SIGINT)
    out, err = r.proc.communicate(timeout=30)
    assert r.proc.returncode == 0, err
    assert out.startswith(f"run {r.cfg.rid}:")
    assert json.loads(r.summary_path.read_text())["sent"] == 10
    r.assert_gone()
