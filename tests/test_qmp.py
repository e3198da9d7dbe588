"""QEMU's QMP socket, driven with the real client library (``qemu.qmp``): the greeting and
capabilities negotiation, QEMU's error texts, the run-state commands and their events, the
x-query-virtio* introspection with qapi/virtio.json's field names agreeing with the guest
driver's own view, human-monitor-command, and quit.
"""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.message import Message
from replica import Replica

from common.monitor.monitor import qmp_path
from common.monitor.qmp import JsonMessageParser
from qemuproc.trace_events import format_event

pytestmark = pytest.mark.usefixtures("no_leftovers")

T = TypeVar("T")
PATH = "/machine/peripheral-anon/device[0]/virtio-backend"
EVENT_TIMEOUT_S = 10.0

# qapi/virtio.json (QEMU 7.2): the members of each returned struct ('*' = optional)
VIRTIO_STATUS = {"name", "device-id", "vhost-started", "device-endian", "guest-features",
                 "host-features", "backend-features", "num-vqs", "status", "isr", "queue-sel",
                 "vm-running", "broken", "disabled", "use-started", "started", "start-on-kick",
                 "disable-legacy-check", "bus-name", "use-guest-notifier-mask"}
VIRTQUEUE_STATUS = {"name", "queue-index", "inuse", "vring-num", "vring-num-default",
                    "vring-align", "vring-desc", "vring-avail", "vring-used", "last-avail-idx",
                    "shadow-avail-idx", "used-idx", "signalled-used", "signalled-used-valid"}
QUEUE_ELEMENT = {"name", "index", "descs", "avail", "used"}


@pytest.fixture(scope="module")
def held(runs_root: Path) -> Iterator[Replica]:
    r = Replica(runs_root, "--hold", "--packets", "200", "--size", "64")
    try:
        r.wait_program_done()
        r.wait_quiet()
        yield r
        r.quit()
    finally:
        r.close()


def with_qmp(r: Replica, body: Callable[[QMPClient], Awaitable[T]], negotiate: bool = True,
             timeout: float = 30.0) -> T:
    """Run ``body(client)`` on a qemu.qmp connection to the run's QMP socket."""
    async def main() -> T:
        c = QMPClient("test")
        c.negotiate = negotiate
        await c.connect(str(qmp_path(r.rundir)))
        try:
            async with asyncio.timeout(timeout):
                return await body(c)
        finally:
            try:
                await c.disconnect()
            except EOFError:  # the server hung up first (quit)
                pass

    return asyncio.run(main())


async def next_event(c: QMPClient, name: str) -> Message:
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        while True:
            ev = await c.events.get()
            if ev["event"] == name:
                return ev


async def error_of(c: QMPClient, cmd: str, args: dict[str, Any] | None = None,
                   oob: bool = False) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as e:
        await c.execute(cmd, args, oob=oob)
    return e.value.error_class, str(e.value)


# -- the protocol -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_greeting_negotiation_and_the_basic_queries(held: Replica) -> None:
    ps = subprocess.run([sys.executable, "-m", "vreplica.cli", "ps", "--json"], env=held.env,
                        capture_output=True, text=True, timeout=30)
    [run] = [x for x in json.loads(ps.stdout)["runs"] if x["run"] == held.cfg.rid]
    assert run["qmp"] == str(qmp_path(held.rundir))
    st = qmp_path(held.rundir).stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(held.rundir.stat().st_mode) == 0o700

    async def body(c: QMPClient) -> None:
        assert c.greeting is not None
        greeting = c.greeting._asdict()["QMP"]
        assert greeting["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
        assert greeting["capabilities"] == ["oob"]
        assert await error_of(c, "query-status") == (
            "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        assert await c.execute("qmp_capabilities") == {}
        assert await error_of(c, "qmp_capabilities") == (
            "CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        assert await c.execute("query-status") == {"status": "running", "singlestep": False,
                                                   "running": True}
        assert await c.execute("query-version") == greeting["version"]
        names = {x["name"] for x in await c.execute("query-commands")}
        assert {"qmp_capabilities", "query-status", "stop", "cont", "query-version",
                "query-commands", "human-monitor-command", "x-query-virtio",
                "x-query-virtio-status", "x-query-virtio-queue-status",
                "x-query-virtio-queue-element", "quit"} <= names
        assert "xp" not in names and "info status" not in names  # HMP only

    with_qmp(held, body, negotiate=False)


@pytest.mark.timeout(60)
def test_qemu_error_texts(held: Replica) -> None:
    async def body(c: QMPClient) -> None:
        assert await error_of(c, "no-such-command") == (
            "CommandNotFound", "The command no-such-command has not been found")
        assert await error_of(c, "x-query-virtio-queue-status", {"path": PATH}) == (
            "GenericError", "Parameter 'queue' is missing")
        assert await error_of(c, "x-query-virtio-queue-status",
                              {"path": PATH, "queue": "1"}) == (
            "GenericError", "Invalid parameter type for 'queue', expected: integer")
        assert await error_of(c, "query-status", {"verbose": True}) == (
            "GenericError", "Parameter 'verbose' is unexpected")
        assert await error_of(c, "x-query-virtio-status", {"path": "/machine/unattached"}) == (
            "GenericError", "Path /machine/unattached is not a VirtIODevice")
        assert await error_of(c, "x-query-virtio-queue-status", {"path": PATH, "queue": 7}) == (
            "GenericError", "Invalid virtqueue number 7")
        assert await error_of(c, "query-status", oob=True) == (
            "GenericError", "The command query-status does not support OOB")
        assert (await c.execute("query-status"))["running"] is True  # the monitor goes on

    with_qmp(held, body)


def test_json_stream_is_split_into_messages() -> None:
    """qemu.qmp sends messages without a separator; a read can end inside one."""
    p = JsonMessageParser()
    assert p.feed('{"execute": "a"}{"execute": "b", "arguments": {"x": "}{"}}{"exe') == [
        ({"execute": "a"}, None), ({"execute": "b", "arguments": {"x": "}{"}}, None)]
    assert p.feed('cute": "c"}\n') == [({"execute": "c"}, None)]
    [(obj, err)] = p.feed('{"execute": tru}')
    assert obj is None and err is not None and err.desc.startswith("JSON parse error")
    assert p.feed("  [1, 2]") == [([1, 2], None)]


# -- run state and events -----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_stop_and_cont_send_stop_and_resume_to_every_client(held: Replica) -> None:
    async def body(c: QMPClient) -> None:
        other = QMPClient("other")
        await other.connect(str(qmp_path(held.rundir)))
        try:
            assert await c.execute("stop") == {}
            for client in (c, other):
                ev = await next_event(client, "STOP")
                assert "data" not in ev
                assert abs(ev["timestamp"]["seconds"] - time.time()) < 60
            assert await c.execute("query-status") == {"status": "paused", "singlestep": False,
                                                       "running": False}
            threads = held.q("qemu", "info status")["threads"]
            deadline = time.monotonic() + 10
            while threads["main-loop"]["state"] != "parked" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                threads = held.q("qemu", "info status")["threads"]
            assert threads["main-loop"]["state"] == "parked"
            assert threads["CPU 0/KVM"]["state"] in ("parked", "stopping")
            # while the main loop is held, QMP still answers (from its gate)
            assert (await c.execute("x-query-virtio"))[0]["path"] == PATH
            assert await c.execute("stop") == {}  # already stopped: no second STOP
            assert await c.execute("cont") == {}
            for client in (c, other):
                async with asyncio.timeout(EVENT_TIMEOUT_S):
                    assert (await client.events.get())["event"] == "RESUME"
            assert (await c.execute("query-status"))["status"] == "running"
            # HMP's stop is the same vm_stop: QMP clients hear it
            held.q("qemu", "stop")
            await next_event(other, "STOP")
            held.q("qemu", "cont")
            await next_event(other, "RESUME")
        finally:
            await other.disconnect()

    with_qmp(held, body)


@pytest.mark.timeout(60)
def test_commands_run_in_the_main_loop_bottom_half(held: Replica) -> None:
    """Each request is run by the main loop's co_schedule_bh, not the monitor's thread."""
    def runs() -> int:
        bh = next(b for b in held.q("qemu", "info bh")["bhs"] if b["name"] == "co_schedule_bh")
        return bh["runs"]

    before = runs()
    n = 5

    async def body(c: QMPClient) -> None:
        for _ in range(n):
            await c.execute("query-status")

    with_qmp(held, body)
    assert runs() >= before + n + 1  # qmp_capabilities, then each query-status


@pytest.mark.timeout(90)
def test_prelaunch_cont_resumes_and_quit_shuts_down(replica: Callable[..., Replica]) -> None:
    r = replica("--wait-attach", "--hold", "--packets", "20")

    async def body(c: QMPClient) -> Message:
        assert (await c.execute("query-status"))["status"] == "prelaunch"
        assert r.q("guest", "info status")["vm_exits"] == 0
        await c.execute("cont")
        await next_event(c, "RESUME")
        while r.q("guest", "info status")["program"] != "done":
            await asyncio.sleep(0.05)
        assert await c.execute("quit") == {}
        return await next_event(c, "SHUTDOWN")

    ev = with_qmp(r, body)
    assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
    out, err = r.proc.communicate(timeout=30)
    assert r.proc.returncode == 0, err
    assert out.startswith(f"run {r.cfg.rid}:")
    r.assert_gone()


# -- virtio introspection -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_x_query_virtio_agrees_with_the_guest_driver(held: Replica) -> None:
    driver = {v["index"]: v for v in held.q("guest", "info virtqueues")}
    sent = held.q("guest", "info netdev")["stats"]["tx_packets"]

    async def body(c: QMPClient) -> tuple[Any, ...]:
        devices = await c.execute("x-query-virtio")
        status = await c.execute("x-query-virtio-status", {"path": PATH})
        queues = [await c.execute("x-query-virtio-queue-status", {"path": PATH, "queue": q})
                  for q in sorted(driver)]
        element = await c.execute("x-query-virtio-queue-element",
                                  {"path": PATH, "queue": 1, "index": 3})
        return devices, status, queues, element

    devices, status, queues, element = with_qmp(held, body)
    assert devices == [{"path": PATH, "name": "virtio-net"}]
    assert set(status) == VIRTIO_STATUS
    assert status["device-id"] == 1 and status["num-vqs"] == len(driver)
    assert status["status"]["statuses"] == [
        "VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found",
        "VIRTIO_CONFIG_S_DRIVER: Guest OS compatible with device",
        "VIRTIO_CONFIG_S_FEATURES_OK: Feature negotiation complete",
        "VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready"]
    assert "VIRTIO_RING_F_EVENT_IDX: Used & avail. event fields enabled" in \
        status["guest-features"]["transports"]
    assert "VIRTIO_NET_F_MAC: Device has given MAC address" in \
        status["host-features"]["dev-features"]
    for q in queues:
        assert set(q) == VIRTQUEUE_STATUS
        d = driver[q["queue-index"]]
        assert (q["vring-desc"], q["vring-avail"], q["vring-used"], q["vring-num"]) == \
            (d["desc"], d["avail"], d["used"], d["num"])
        assert q["used-idx"] == d["used_idx"]
    assert queues[1]["last-avail-idx"] == driver[1]["avail_idx_shadow"] == sent
    assert set(element) == QUEUE_ELEMENT
    ring = held.q("qemu", f"xp /{driver[1]['num']}uh {driver[1]['avail'] + 4}")["values"]
    assert element["index"] == element["avail"]["ring"] == ring[3]
    desc = held.q("guest", f"x /2g {driver[1]['desc'] + 16 * element['index']}")["values"]
    assert element["descs"] == [{"addr": desc[0], "len": desc[1] & 0xFFFFFFFF, "flags": []}]
    assert element["avail"]["idx"] == sent and element["used"]["idx"] == sent


@pytest.mark.timeout(60)
def test_human_monitor_command_runs_hmp_from_the_same_table(held: Replica) -> None:
    async def body(c: QMPClient) -> tuple[Any, ...]:
        return (await c.execute("human-monitor-command", {"command-line": "info status"}),
                await c.execute("human-monitor-command",
                                {"command-line": "info virtio-queue-status 1"}),
                await c.execute("x-query-virtio-queue-status", {"path": PATH, "queue": 1}),
                await c.execute("human-monitor-command", {"command-line": "info nothing"}))

    status, text, data, bad = with_qmp(held, body)
    assert status.startswith("VM status: running\n")
    assert f"  used_idx:             {data['used-idx']}\n" in text
    assert f"    desc:         0x{data['vring-desc']:016x}\n" in text
    assert bad == "Error: unknown command: 'info nothing'\n"


@pytest.mark.timeout(120)
def test_trace_shows_requests_read_in_the_io_thread_and_run_in_the_main_loop(
        replica: Callable[..., Replica], tmp_path: Path) -> None:
    trace = tmp_path / "qmp.json"
    r = replica("--hold", "--packets", "5", "--trace", str(trace), "--trace-events",
                "handle_qmp_command,monitor_qmp_cmd_in_band,monitor_qmp_respond")
    r.wait_program_done()

    async def body(c: QMPClient) -> None:
        await c.execute("query-status")

    with_qmp(r, body)
    r.quit()
    events = json.loads(trace.read_text())["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e["name"] == "thread_name"}
    seen = [(e["name"], threads.get((e["pid"], e["tid"])), e["args"]) for e in events
            if e["ph"] == "i"]
    read = [t for name, t, a in seen if name == "handle_qmp_command"
            and json.loads(a["req"])["execute"] == "query-status"]
    ran = [t for name, t, a in seen if name == "monitor_qmp_cmd_in_band"]
    assert read and all(t != "main loop" for t in read)
    assert ran and set(ran) == {"main loop"}
    assert any('"status": "running"' in a["json"] for name, _, a in seen
               if name == "monitor_qmp_respond")
    for name, _, args in seen:  # monitor/trace-events: QEMU 7.2's arguments and format
        assert format_event(name, args) is not None, (name, args)


@pytest.mark.timeout(90)
def test_the_guests_shutdown_is_a_guest_reset_shutdown(replica: Callable[..., Replica]) -> None:
    """Without --hold the guest ends with a triple fault: a reset request that -no-reboot
    turns into a shutdown, which QMP clients hear as SHUTDOWN from the guest."""
    r = replica("--wait-attach", "--packets", "10")

    async def body(c: QMPClient) -> Message:
        await c.execute("cont")
        await next_event(c, "RESUME")
        return await next_event(c, "SHUTDOWN")

    ev = with_qmp(r, body)
    assert ev["data"] == {"guest": True, "reason": "guest-reset"}
    out, err = r.proc.communicate(timeout=30)
    assert r.proc.returncode == 0, err
    assert json.loads(r.summary_path.read_text())["sent"] == 10
    r.assert_gone()


@pytest.mark.timeout(90)
def test_ctrl_c_is_a_host_signal_shutdown(replica: Callable[..., Replica]) -> None:
    r = replica("--hold", "--packets", "5")
    r.wait_program_done()

    async def body(c: QMPClient) -> Message:
        r.proc.send_signal(signal.SIGINT)
        return await next_event(c, "SHUTDOWN")

    ev = with_qmp(r, body)
    assert ev["data"] == {"guest": False, "reason": "host-signal"}
    r.proc.communicate(timeout=30)
    assert r.proc.returncode == 0
    r.assert_gone()
