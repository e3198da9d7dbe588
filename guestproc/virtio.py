"""Stands for drivers/virtio/virtio.c: the virtio bus: device registration, the status
handshake and feature negotiation, and the config-space accessors drivers use."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.trace import trace_event, traced
from common.virtio_abi import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_TRANSPORT_F_END,
    VIRTIO_TRANSPORT_F_START,
)

trace_virtio_add_status = trace_event("virtio_add_status")


@dataclass(frozen=True)
class VirtioConfigOps:
    """struct virtio_config_ops: what a transport offers the virtio core and drivers."""

    get: Callable[[Any, int, int], bytes]
    set: Callable[[Any, int, bytes], None]
    get_status: Callable[[Any], int]
    set_status: Callable[[Any, int], None]
    reset: Callable[[Any], None]
    find_vqs: Callable[..., list]
    del_vqs: Callable[[Any], None]
    get_features: Callable[[Any], int]
    finalize_features: Callable[[Any], int]
    bus_name: Callable[[Any], str]
    set_vq_affinity: Callable[[Any, int], int]
    generation: Callable[[Any], int] | None = None


@dataclass
class VirtioDriver:
    """struct virtio_driver: the features a driver understands, its probe, and what it does
    when the device's configuration changes (a config interrupt)."""

    name: str
    feature_table: list[int]
    probe: Callable[[Any], Any]
    config_changed: Callable[[Any], None] | None = None
    feature_table_legacy: list[int] | None = None
    """Features offered to a legacy device only (without VIRTIO_F_VERSION_1)."""


class VirtioFeaturesError(Exception):
    pass


def virtio_has_feature(vdev: Any, bit: int) -> bool:
    return bool(vdev.features & (1 << bit))


def virtio_add_status(vdev: Any, status: int) -> None:
    if trace_virtio_add_status.on:
        trace_virtio_add_status(status=status)
    vdev.config.set_status(vdev, vdev.config.get_status(vdev) | status)


def vring_transport_features(vdev: Any) -> None:
    """Keep only the transport bits (28..41) this ring implementation understands."""
    keep = {VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX, VIRTIO_F_VERSION_1,
            VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED}
    for bit in range(VIRTIO_TRANSPORT_F_START, VIRTIO_TRANSPORT_F_END):
        if bit not in keep:
            vdev.features &= ~(1 << bit)


def virtio_features_ok(vdev: Any) -> None:
    virtio_add_status(vdev, VIRTIO_CONFIG_S_FEATURES_OK)
    if not vdev.config.get_status(vdev) & VIRTIO_CONFIG_S_FEATURES_OK:
        raise VirtioFeaturesError("virtio: device refuses features")


def virtio_device_ready(vdev: Any) -> None:
    status = vdev.config.get_status(vdev)
    vdev.config.set_status(vdev, status | VIRTIO_CONFIG_S_DRIVER_OK)


@traced
def virtio_dev_probe(vdev: Any, driver: VirtioDriver) -> Any:
    virtio_add_status(vdev, VIRTIO_CONFIG_S_DRIVER)
    device_features = vdev.config.get_features(vdev)
    driver_features = 0
    for bit in driver.feature_table:
        driver_features |= 1 << bit
    driver_features_legacy = driver_features
    if driver.feature_table_legacy is not None:
        driver_features_legacy = 0
        for bit in driver.feature_table_legacy:
            driver_features_legacy |= 1 << bit
    if device_features >> VIRTIO_F_VERSION_1 & 1:
        vdev.features = driver_features & device_features
    else:
        vdev.features = driver_features_legacy & device_features
    for bit in range(VIRTIO_TRANSPORT_F_START, VIRTIO_TRANSPORT_F_END):
        vdev.features |= device_features & (1 << bit)  # kept for finalize_features
    vdev.config.finalize_features(vdev)
    try:
        virtio_features_ok(vdev)
        return driver.probe(vdev)
    except Exception:
        virtio_add_status(vdev, VIRTIO_CONFIG_S_FAILED)
        raise


@traced
def register_virtio_device(vdev: Any, driver: VirtioDriver) -> Any:
    """Reset the device, acknowledge it, and let the matching driver probe it."""
    vdev.config.reset(vdev)
    virtio_add_status(vdev, VIRTIO_CONFIG_S_ACKNOWLEDGE)
    return virtio_dev_probe(vdev, driver)


def virtio_config_changed(vdev: Any) -> None:
    """A config interrupt came: the bound driver's config_changed, if it has one."""
    drv = vdev.driver
    if drv is not None and drv.config_changed is not None:
        drv.config_changed(vdev)


def __virtio_cread_many(vdev: Any, offset: int, count: int, nbytes: int) -> bytes:
    """``count`` fields of ``nbytes`` each, read again until the device's config generation
    is the same before and after (no config change tore them)."""
    generation = vdev.config.generation
    gen = generation(vdev) if generation is not None else 0
    while True:
        old = gen
        buf = b"".join(vdev.config.get(vdev, offset + nbytes * i, nbytes) for i in range(count))
        gen = generation(vdev) if generation is not None else 0
        if gen == old:
            return buf


def virtio_cread_bytes(vdev: Any, offset: int, length: int) -> bytes:
    return __virtio_cread_many(vdev, offset, length, 1)


def virtio_cread16(vdev: Any, offset: int) -> int:
    return struct.unpack("<H", vdev.config.get(vdev, offset, 2))[0]
