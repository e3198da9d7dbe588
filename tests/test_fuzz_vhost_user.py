"""The untrusted guest against the vhost-user backend's ring code, in process
(vreplica.fuzz_vhost_user's state machine with a CI budget)."""

from __future__ import annotations

import os

import pytest

from vreplica.fuzz import fuzz_settings, stats
from vreplica.fuzz_vhost_user import VhostUserBackendFuzz

pytestmark = pytest.mark.usefixtures("no_leftovers")
CI_EXAMPLES = 60


@pytest.mark.timeout(180)
def test_hostile_guest_against_the_backend() -> None:
    """Arbitrary rings, indices, tables, kicks and reconnects: the backend never raises,
    a broken device says why and does nothing more, valid chains are used and their bytes
    delivered; no fd is left open."""
    fds = len(os.listdir("/proc/self/fd"))
    stats["tx_frames"] = stats["rx_frames"] = 0
    test = VhostUserBackendFuzz.TestCase("runTest")
    test.settings = fuzz_settings(CI_EXAMPLES)
    test.runTest()
    assert stats["tx_frames"] > 0 and stats["rx_frames"] > 0  # the valid paths ran
    assert len(os.listdir("/proc/self/fd")) == fds
