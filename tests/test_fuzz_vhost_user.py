"""The untrusted guest against the vhost-user backend's ring code, in process
(vreplica.fuzz_vhost_user's state machine with a CI budget)."""

from __future__ import annotations

import os

import pytest

from vreplica.fuzz.machine import fuzz_settings, stats
from vreplica.fuzz.vhost_user import VhostUserBackendFuzz

pytestmark = pytest.mark.usefixtures("no_leftovers")
CI_EXAMPLES = 60


def open_fds() -> int:
    """This process's fds but those the leftover watcher's thread opens under /proc."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += not os.readlink(f"/proc/self/fd/{fd}").startswith("/proc/")
        except OSError:
            pass
    return n


@pytest.mark.timeout(180)
def test_hostile_guest_against_the_backend() -> None:
    """Arbitrary rings, indices, tables, kicks and reconnects: the backend never raises,
    a broken device says why and does nothing more, valid chains are used and their bytes
    delivered; no fd is left open."""
    fds = open_fds()
    stats["tx_frames"] = stats["rx_frames"] = 0
    test = VhostUserBackendFuzz.TestCase("runTest")
    test.settings = fuzz_settings(CI_EXAMPLES)
    test.runTest()
    assert stats["tx_frames"] > 0 and stats["rx_frames"] > 0  # the valid paths ran
    assert open_fds() == fds
