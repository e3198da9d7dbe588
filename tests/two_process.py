"""A driver process and a device process on one ring: the runner the two-process ring tests
share. The driver starts first and says "ready" once its ring is in guest RAM; then the
device starts; each sends one result back over its own pipe."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def receive(conn: Connection, proc: multiprocessing.process.BaseProcess,
            timeout: float) -> Any:
    if not conn.poll(timeout):
        raise AssertionError(f"{proc.name} sent no result within {timeout} s "
                             f"(exit code {proc.exitcode})")
    return conn.recv()


def run_driver_and_device(driver_main: Callable[..., None], driver_args: tuple[Any, ...],
                          device_main: Callable[..., None], device_args: tuple[Any, ...]
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both processes' results; each ``*_main`` gets its args and then its pipe's end. Both
    are gone when this returns (killed after 10 s if they have not exited)."""
    ctx = multiprocessing.get_context("spawn")
    drv_r, drv_w = ctx.Pipe(duplex=False)
    dev_r, dev_w = ctx.Pipe(duplex=False)
    driver = ctx.Process(target=driver_main, name="driver", args=(*driver_args, drv_w))
    device = ctx.Process(target=device_main, name="device", args=(*device_args, dev_w))
    driver.start()
    try:
        assert receive(drv_r, driver, 60) == "ready"
        device.start()
        drv = receive(drv_r, driver, 90)
        dev = receive(dev_r, device, 30)
    finally:
        for p in (driver, device):
            if p.pid is None:
                continue
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    drv["exitcode"], dev["exitcode"] = driver.exitcode, device.exitcode
    return drv, dev
