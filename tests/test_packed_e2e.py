"""The packed ring end to end (``--transport modern|transitional --ring packed``): the real
three processes, the guest's driver negotiating VIRTIO_F_RING_PACKED from the modern device,
every datagram out and back, and QEMU's monitor agreeing with the driver's ring state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from replica import Replica, run_summary

pytestmark = pytest.mark.usefixtures("no_leftovers")


def run(tmp_path: Path, *args: str, timeout: float = 90) -> dict:
    return run_summary(tmp_path, *args, timeout=timeout)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", [
    ("--transport", "modern", "--queues", "2", "--mrg-rxbuf", "on", "--size", "1400"),
    ("--transport", "transitional", "--vectors", "0", "--event-idx", "off",
     "--indirect-desc", "off"),
], ids=["modern-mq-mrg-msix", "transitional-intx-no-event-idx"])
def test_packed_echo_every_datagram_both_ways(tmp_path: Path, args: tuple[str, ...]) -> None:
    """200 datagrams through a 64-entry packed ring (the wrap counters flip many times), each
    answered by the host's echo service: every one leaves and every reply comes back, once."""
    s = run(tmp_path, "--ring", "packed", "--mode", "echo", "--packets", "200", "--window", "8",
            "--queue-size", "64", "--timeout", "60", *args)
    assert s["ring"] == "packed" and s["driver_transport"] in ("modern", None)
    assert s["sent"] == s["delivered"] == s["replies"] == 200
    assert s["bad_replies"] == 0 and s["duplicate_replies"] == 0
    assert s["device_errors"] == [] and s["guest_resets"] == 0
    if "--vectors" in args:
        assert s["interrupt_mode"] == "intx"


@pytest.fixture(scope="module")
def held(runs_root: Path) -> Iterator[Replica]:
    r = Replica(runs_root, "--hold", "--transport", "modern", "--ring", "packed",
                "--packets", "150", "--queue-size", "64")
    try:
        r.wait_program_done()
        r.wait_quiet()
        yield r
        r.quit()
    finally:
        r.close()


@pytest.mark.timeout(60)
def test_queue_status_shows_the_wrap_counters_the_driver_has(held: Replica) -> None:
    """QEMU's TX queue status (with the packed ring's wrap counters) is the driver's ring
    state: the same three areas, the device's used position and wrap counter are the
    driver's last_used and its used wrap counter, the avail ones its next_avail; the guest
    negotiated VIRTIO_F_RING_PACKED. The element query refuses a packed ring as 7.2 does."""
    tx = held.q("qemu", "info virtio-queue-status 1")
    drv = next(v for v in held.q("guest", "info virtqueues") if v["index"] == 1)
    status = held.q("qemu", "info virtio-status")
    assert any(t.startswith("VIRTIO_F_RING_PACKED") for t in
               status["guest-features"]["transports"])
    assert drv["packed"] is True and drv["num"] == tx["vring-num"] == 64
    assert (tx["vring-desc"], tx["vring-avail"], tx["vring-used"]) == \
        (drv["desc"], drv["avail"], drv["used"])
    assert tx["inuse"] == 0 and drv["num_free"] == 64
    assert tx["last-avail-idx"] == tx["used-idx"] == drv["next_avail_idx"] == \
        drv["last_used_idx"]
    assert tx["last-avail-wrap-counter"] == tx["used-wrap-counter"] == \
        bool(drv["avail_wrap_counter"]) == bool(drv["used_wrap_counter"])
    frames = held.q("guest", "info netdev")["stats"]["tx_packets"]
    assert frames >= 150  # each one descriptor (any_layout): positions and wraps follow
    assert tx["used-idx"] == frames % 64
    assert tx["used-wrap-counter"] is (frames // 64 % 2 == 0)
    human = held.attach("qemu", "-c", "info virtio-queue-status 1").stdout
    assert f"used_wrap_counter:    {str(tx['used-wrap-counter']).lower()}" in human
    r = held.attach("qemu", "-c", "info virtio-queue-element 1")
    assert r.returncode == 1 and "Packed ring not supported" in r.stderr
