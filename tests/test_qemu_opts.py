"""QEMU's command line on ``vreplica run``: bad properties get QEMU's wording and exit 2
before anything is made; ``-device virtio-net-pci,help`` lists the properties with the
defaults a run really has; a run given QEMU's options has the device, memory, netdev and
trace they describe.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from replica import Replica

from vreplica.run.qemu_opts import qemu_options

pytestmark = pytest.mark.usefixtures("no_leftovers")

REPO = Path(__file__).resolve().parent.parent
DEV = "virtio-net-pci"

BAD = [
    (["-device", f"{DEV},ioeventfd=maybe"],
     f"-device {DEV},ioeventfd=maybe: Parameter 'ioeventfd' expects 'on' or 'off'"),
    (["-device", f"{DEV},vectors=-1"],
     f"-device {DEV},vectors=-1: Parameter 'vectors' expects uint32"),
    (["-device", f"{DEV},x-txburst=many"],
     f"-device {DEV},x-txburst=many: Parameter 'x-txburst' expects int32"),
    (["-device", f"{DEV},x-txtimer=1e9"],
     f"-device {DEV},x-txtimer=1e9: Parameter 'x-txtimer' expects uint32"),
    (["-device", f"{DEV},tx=fast"],
     f"-device {DEV},tx=fast: virtio-net: Unknown option tx=fast, valid options: \"timer\" "
     "\"bh\""),
    (["-device", f"{DEV},queue_depth=4"],
     f"-device {DEV},queue_depth=4: Property '{DEV}.queue_depth' not found"),
    (["-device", "e1000,netdev=n0"], "-device e1000,netdev=n0: 'e1000' is not a valid device "
                                     "model name"),
    (["-device", f"{DEV},netdev=n1", "-netdev", "user,id=n0"],
     f"-device {DEV},netdev=n1: Property '{DEV}.netdev' can't find value 'n1'"),
    (["-netdev", "user,hostfwd=udp::5555-:7000"],
     "-netdev user,hostfwd=udp::5555-:7000: Parameter 'id' is missing"),
    (["-netdev", "user,id=n0,smb=/tmp"], "-netdev user,id=n0,smb=/tmp: Invalid parameter 'smb'"),
    (["-device", f"{DEV},mq=off", "--queues", "2"],
     f"-device {DEV},mq=off: --queues 2 needs mq=on"),
    (["-m"], "-m requires an argument"),
    (["-device", f"{DEV},disable-legacy=on,disable-modern=on"],
     f"-device {DEV},disable-legacy=on,disable-modern=on: device cannot work as neither "
     "modern nor legacy mode is enabled"),
    (["-device", f"{DEV},disable-legacy=maybe"],
     f"-device {DEV},disable-legacy=maybe: Parameter 'disable-legacy' does not accept value "
     "'maybe'"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("props", "transport"), [
    ("disable-modern=off", "transitional"),
    ("disable-legacy=on,disable-modern=off", "modern"),
    ("disable-legacy=off,disable-modern=on", "legacy"),
    ("disable-legacy=auto", "legacy"),
])
def test_disable_legacy_and_modern_become_transport(props: str, transport: str) -> None:
    assert qemu_options(["-device", f"{DEV},{props}"]) == ["--transport", transport]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", BAD)
def test_bad_property_gets_qemus_wording_and_exit_2(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "vreplica.cli", "run", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr == f"vreplica: {message}\n"
    assert r.stdout == ""


def test_options_become_the_replicas_own_where_they_stand() -> None:
    assert qemu_options(["--packets", "5", "-device", f"{DEV},ioeventfd=off,vectors=0",
                         "--ioeventfd", "on", "-S", "-m", "size=32"]) == [
        "--packets", "5", "--ioeventfd", "off", "--vectors", "0", "--ioeventfd", "on",
        "--wait-attach", "--mem", "32M"]
    assert qemu_options(["-trace", "virtqueue_*", "-trace", "enable=sosendto,file=t.json"]) \
        == ["--trace-events", "virtqueue_*,sosendto", "--trace", "t.json"]
    assert qemu_options(["-trace", "help"]) == ["--trace-events", "help"]
    assert qemu_options(["-netdev", "user,id=n0,hostfwd=udp::5555-:7000", "-device",
                         f"{DEV},netdev=n0,mrg_rxbuf,event_idx=off"]) == [
        "--hostfwd", "udp::5555-:7000", "--mrg-rxbuf", "on", "--event-idx", "off"]


def qtree_props(r: Replica) -> dict[str, str]:
    """The virtio-net-pci proxy's and the virtio-net device's properties, as printed."""
    out = r.attach("qemu", "-c", "info qtree")
    assert out.returncode == 0, out.stderr
    props = {}
    for line in out.stdout.splitlines():
        name, eq, value = line.strip().partition(" = ")
        if eq:
            props[name] = value
    return props


@pytest.mark.timeout(120)
def test_help_lists_the_defaults_a_run_has(replica: Callable[..., Replica]) -> None:
    r = subprocess.run([sys.executable, "-m", "vreplica.cli", "run", "-device", f"{DEV},help"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0] == f"{DEV} options:"
    defaults = {}
    for line in lines[1:]:
        head, _, tail = line.partition(" - ")
        name, _, kind = head.strip().partition("=")
        assert kind.startswith("<") and kind.endswith(">"), line
        if "(default: " in tail:
            defaults[name] = json.loads(tail.rsplit("(default: ", 1)[1].rstrip(")"))
    assert list(defaults) == sorted(defaults)
    assert {"ioeventfd", "event_idx", "mq", "vectors", "tx", "x-txtimer", "x-txburst",
            "mrg_rxbuf"} <= set(defaults)

    run = replica("--hold", "--packets", "5")
    run.wait_program_done()
    shown = qtree_props(run)
    for name, default in defaults.items():
        if name in ("vectors", "mq"):
            continue
        value = shown[name]
        if isinstance(default, bool):
            assert value == ("true" if default else "false"), name
        elif isinstance(default, int):
            assert int(value.split()[0]) == default, name
        else:
            assert value == json.dumps(default), name
    run.quit()


@pytest.mark.timeout(120)
def test_a_run_from_qemus_options(replica: Callable[..., Replica], tmp_path: Path) -> None:
    trace = tmp_path / "t.json"
    r = replica("--hold", "--packets", "30", "-S", "-m", "32",
                "-netdev", "user,id=net0",
                "-device", f"{DEV},netdev=net0,ioeventfd=off,tx=timer,x-txtimer=200000,"
                           "x-txburst=64,vectors=0,event_idx=off",
                "-trace", f"enable=virtqueue_pop,file={trace}")
    assert r.q("qemu", "info status")["status"] == "prelaunch"
    assert r.q("qemu", "info status")["ram"]["size"] == 32 << 20
    props = qtree_props(r)
    assert props["ioeventfd"] == "false" and props["vectors"] == "0 (0x0)"
    assert props["tx"] == '"timer"' and props["x-txtimer"] == "200000 (0x30d40)"
    assert props["x-txburst"] == "64 (0x40)" and props["event_idx"] == "false"
    r.q("qemu", "cont")
    r.wait_program_done()
    assert not [e for e in r.q("kvm", "info ioeventfd") if e["bus"] == "pio"]
    stats = r.q("qemu", "info stats")
    assert stats["queues"]["TX(q1)"]["pops"] >= 30
    assert stats["kvm_run_exits"]["KVM_EXIT_IO"] > 0
    summary = r.quit()
    assert summary["sent"] == 30 and summary["delivered"] == 30
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["name"] for e in events if e["ph"] in ("X", "i")}
    assert names == {"virtqueue_pop"}
