"""``common.vring`` against the kernel's own ``<linux/virtio_ring.h>``, compiled with gcc.

The C program runs ``vring_init`` / ``vring_size`` / ``vring_need_event`` and the
``vring_used_event`` / ``vring_avail_event`` macros on real memory and prints what they give;
the tests hold the Python layout and event arithmetic to exactly those numbers. For the packed
ring it prints ``struct vring_packed_desc`` / ``struct vring_packed_desc_event`` (sizes,
offsets, the bytes of one filled-in descriptor), the header's packed constants, and the
event-offset decision Linux's ``virtqueue_kick_prepare_packed`` makes from the header's
``vring_need_event``.
"""

from __future__ import annotations

import shutil
import subprocess
from itertools import product
from pathlib import Path

import pytest

from common.vring import (
    DESC,
    VRING_DESC_SIZE,
    VRING_USED_ELEM_SIZE,
    VringLayout,
    vring_need_event,
    vring_size,
)
from common.vring_packed import (
    DESC_FLAGS_H,
    DESC_ID_H,
    EVENT_FLAGS_H,
    EVENT_OFF_WRAP_H,
    PACKED_DESC,
    PACKED_DESC_EVENT,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_DESC_SIZE,
    VRING_PACKED_EVENT_F_WRAP_CTR,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    VRING_PACKED_EVENT_SIZE,
)

HEADER = Path("/usr/include/linux/virtio_ring.h")
NUMS = (1, 2, 4, 8, 256, 1024, 32768)
ALIGNS = (4096, 64)
BASE = 0x10000
"""Where the Python layouts are placed: a guest-physical address that is not 0."""

PACKED_NUMS = (1, 4, 256, 1000)
"""Packed rings need not be a power of two in size."""

EDGE_U16 = (0, 1, 2, 3, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFD, 0xFFFE, 0xFFFF)

C_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stddef.h>
#include <linux/virtio_ring.h>

static const unsigned nums[] = {%(nums)s};
static const unsigned long aligns[] = {%(aligns)s};
static const unsigned short grid[] = {%(grid)s};
static const unsigned short pnums[] = {%(pnums)s};

/* The event decision of virtqueue_kick_prepare_packed (drivers/virtio/virtio_ring.c). */
static int packed_need_event(unsigned num, int wrap_counter, uint16_t off_wrap, uint16_t new,
                             uint16_t old)
{
    int wrap = off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR;
    uint16_t event_idx = off_wrap & ~(1 << VRING_PACKED_EVENT_F_WRAP_CTR);
    if (wrap != wrap_counter)
        event_idx -= num;
    return vring_need_event(event_idx, new, old);
}

int main(void)
{
    printf("sizes %%zu %%zu\n", sizeof(struct vring_desc), sizeof(struct vring_used_elem));
    printf("packed %%zu %%zu %%zu %%zu %%zu %%zu %%zu %%zu\n",
           sizeof(struct vring_packed_desc), offsetof(struct vring_packed_desc, addr),
           offsetof(struct vring_packed_desc, len), offsetof(struct vring_packed_desc, id),
           offsetof(struct vring_packed_desc, flags), sizeof(struct vring_packed_desc_event),
           offsetof(struct vring_packed_desc_event, off_wrap),
           offsetof(struct vring_packed_desc_event, flags));
    printf("pconst %%d %%d %%d %%d %%d %%d\n", VRING_PACKED_DESC_F_AVAIL,
           VRING_PACKED_DESC_F_USED, VRING_PACKED_EVENT_FLAG_ENABLE,
           VRING_PACKED_EVENT_FLAG_DISABLE, VRING_PACKED_EVENT_FLAG_DESC,
           VRING_PACKED_EVENT_F_WRAP_CTR);
    struct vring_packed_desc d = {
        .addr = 0x1122334455667788ULL, .len = 0x99aabbcc, .id = 0xddee,
        .flags = 1 << VRING_PACKED_DESC_F_AVAIL | VRING_DESC_F_NEXT,
    };
    struct vring_packed_desc_event ev = {.off_wrap = 0x8123, .flags = 0x0002};
    printf("pbytes ");
    for (unsigned k = 0; k < sizeof(d); k++)
        printf("%%u ", ((unsigned char *)&d)[k]);
    for (unsigned k = 0; k < sizeof(ev); k++)
        printf("%%u ", ((unsigned char *)&ev)[k]);
    printf("\n");
    for (unsigned i = 0; i < sizeof(nums) / sizeof(nums[0]); i++) {
        for (unsigned j = 0; j < sizeof(aligns) / sizeof(aligns[0]); j++) {
            unsigned num = nums[i];
            unsigned long align = aligns[j];
            unsigned size = vring_size(num, align);
            void *p = NULL;
            if (posix_memalign(&p, 4096, size + 4096))
                return 1;
            struct vring vr;
            vring_init(&vr, num, p, align);
            char *b = p;
            printf("layout %%u %%lu %%u %%td %%td %%td %%td %%td\n", num, align, size,
                   (char *)vr.desc - b, (char *)vr.avail - b, (char *)vr.used - b,
                   (char *)&vring_used_event(&vr) - b, (char *)&vring_avail_event(&vr) - b);
            free(p);
        }
    }
    unsigned n = sizeof(grid) / sizeof(grid[0]);
    for (unsigned e = 0; e < n; e++)
        for (unsigned w = 0; w < n; w++)
            for (unsigned o = 0; o < n; o++)
                printf("need %%u %%u %%u %%d\n", grid[e], grid[w], grid[o],
                       vring_need_event(grid[e], grid[w], grid[o]));
    for (unsigned k = 0; k < sizeof(pnums) / sizeof(pnums[0]); k++)
        for (unsigned wc = 0; wc < 2; wc++)
            for (unsigned ow = 0; ow < 2; ow++)
                for (unsigned off = 0; off < pnums[k]; off += 1 + pnums[k] / 7)
                    for (unsigned o = 0; o < pnums[k]; o += 1 + pnums[k] / 5)
                        for (unsigned a = 0; a <= pnums[k]; a += 1 + pnums[k] / 6) {
                            uint16_t off_wrap = off | ow << VRING_PACKED_EVENT_F_WRAP_CTR;
                            uint16_t new = (o + a) %% pnums[k];
                            printf("pneed %%u %%u %%u %%u %%u %%d\n", pnums[k], wc, off_wrap,
                                   new, o, packed_need_event(pnums[k], wc, off_wrap, new, o));
                        }
    return 0;
}
"""


def need_event_grid() -> list[int]:
    """u16 values around 0, the half-way point and the wrap, plus ordinary ones."""
    return sorted(set(EDGE_U16) | {10, 11, 12, 255, 256, 1000, 40000})


@pytest.fixture(scope="module")
def c_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[list[int]]]:
    """The C program's output lines, grouped by their first word."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is not installed (the README requires a C compiler)", pytrace=False)
    if not HEADER.is_file():
        pytest.fail(f"{HEADER} is missing (install linux-libc-dev; the README requires it)",
                    pytrace=False)
    d = tmp_path_factory.mktemp("vring_c")
    src = d / "vring_check.c"
    src.write_text(C_PROGRAM % {
        "nums": ", ".join(map(str, NUMS)),
        "aligns": ", ".join(f"{a}UL" for a in ALIGNS),
        "grid": ", ".join(f"0x{v:x}" for v in need_event_grid()),
        "pnums": ", ".join(map(str, PACKED_NUMS)),
    })
    exe = d / "vring_check"
    subprocess.run([gcc, "-std=gnu11", "-Wall", "-Werror", "-O1", "-o", str(exe), str(src)],
                   check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60)
    groups: dict[str, list[list[int]]] = {}
    for line in out.stdout.splitlines():
        word, *nums = line.split()
        groups.setdefault(word, []).append([int(x) for x in nums])
    return groups


@pytest.mark.timeout(10)
def test_c_compiler_and_kernel_header_are_present() -> None:
    """The README requires both: their absence is a failure, not a reason to skip."""
    assert shutil.which("gcc") is not None, "gcc is not installed"
    assert HEADER.is_file(), f"{HEADER} is missing (linux-libc-dev)"


@pytest.mark.timeout(60)
def test_struct_sizes_match_kernel(c_results: dict[str, list[list[int]]]) -> None:
    """sizeof(struct vring_desc) and sizeof(struct vring_used_elem) are what Python packs."""
    [[desc_size, used_elem_size]] = c_results["sizes"]
    assert (desc_size, used_elem_size) == (VRING_DESC_SIZE, VRING_USED_ELEM_SIZE)
    assert DESC.size == desc_size


@pytest.mark.timeout(60)
def test_layout_matches_vring_init(c_results: dict[str, list[list[int]]]) -> None:
    """For every (num, align): vring_size and every part's offset equal the kernel's."""
    rows = c_results["layout"]
    assert {(r[0], r[1]) for r in rows} == set(product(NUMS, ALIGNS))
    for num, align, size, desc, avail, used, used_event, avail_event in rows:
        lay = VringLayout(num, BASE, align)
        got = (vring_size(num, align), lay.size, lay.desc - BASE, lay.avail - BASE,
               lay.used - BASE, lay.used_event - BASE, lay.avail_event - BASE, lay.end - BASE)
        want = (size, size, desc, avail, used, used_event, avail_event, size)
        assert got == want, f"num={num} align={align}"


@pytest.mark.timeout(60)
def test_need_event_matches_kernel_macro(c_results: dict[str, list[list[int]]]) -> None:
    """vring_need_event agrees with the C one on every (event, new, old) of the grid."""
    rows = c_results["need"]
    assert len(rows) == len(need_event_grid()) ** 3
    wrong = [(e, n, o, c) for e, n, o, c in rows if vring_need_event(e, n, o) != bool(c)]
    assert not wrong, f"(event, new, old, C) where Python differs: {wrong[:10]}"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("event", "new", "old", "expected"), [
    (0, 1, 0, True),
    (0, 2, 1, False),
    (5, 5, 5, False),
    (4, 5, 4, True),
    (4, 8, 2, True),
    (8, 8, 2, False),
    (1, 8, 2, False),
    (0xFFFF, 0, 0xFFFE, True),
    (0xFFFE, 1, 0xFFFD, True),
    (0, 1, 0xFFFF, True),
    (1, 1, 0xFFFF, False),
    (0xFFFF, 0xFFFF, 0xFFFE, False),
    (0xFFFD, 2, 0xFFFE, False),
    (0x8000, 0x8001, 0x7FFF, True),
    (0, 0x8000, 0, True),
    (0xFFFF, 0, 0, False),
])
def test_need_event_truth_table(event: int, new: int, old: int, expected: bool) -> None:
    """The index moving old -> new (mod 2^16) passes event exactly when event is in [old, new)."""
    assert vring_need_event(event, new, old) is expected


@pytest.mark.timeout(10)
def test_driver_and_device_call_the_checked_need_event() -> None:
    """The driver's kick decision and the device's interrupt decision use the very function
    the C comparison above checks, not copies of its arithmetic."""
    import guestproc.virtio_ring
    import qemuproc.virtio

    assert guestproc.virtio_ring.vring_need_event is vring_need_event
    assert qemuproc.virtio.vring_need_event is vring_need_event


@pytest.mark.timeout(60)
def test_packed_structs_match_kernel(c_results: dict[str, list[list[int]]]) -> None:
    """struct vring_packed_desc and struct vring_packed_desc_event: sizes and field offsets
    are what common.vring_packed packs and indexes, and one filled-in descriptor and event
    structure are byte for byte what PACKED_DESC / PACKED_DESC_EVENT pack."""
    [[dsize, o_addr, o_len, o_id, o_flags, esize, o_off_wrap, o_eflags]] = c_results["packed"]
    assert (dsize, esize) == (VRING_PACKED_DESC_SIZE, VRING_PACKED_EVENT_SIZE)
    assert (PACKED_DESC.size, PACKED_DESC_EVENT.size) == (dsize, esize)
    assert (o_addr, o_len) == (0, 8)
    assert (o_id, o_flags) == (DESC_ID_H * 2, DESC_FLAGS_H * 2)
    assert (o_off_wrap, o_eflags) == (EVENT_OFF_WRAP_H * 2, EVENT_FLAGS_H * 2)
    [raw] = c_results["pbytes"]
    flags = (1 << VRING_PACKED_DESC_F_AVAIL) | 1
    want = PACKED_DESC.pack(0x1122334455667788, 0x99AABBCC, 0xDDEE, flags) + \
        PACKED_DESC_EVENT.pack(0x8123, 0x0002)
    assert bytes(raw) == want


@pytest.mark.timeout(60)
def test_packed_constants_match_kernel(c_results: dict[str, list[list[int]]]) -> None:
    [consts] = c_results["pconst"]
    assert consts == [VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED,
                      VRING_PACKED_EVENT_FLAG_ENABLE, VRING_PACKED_EVENT_FLAG_DISABLE,
                      VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_F_WRAP_CTR]


@pytest.mark.timeout(60)
def test_packed_need_event_matches_linux_kick_decision(
        c_results: dict[str, list[list[int]]]) -> None:
    """QEMU's vring_packed_need_event (the device's interrupt decision) agrees with the
    offset/wrap arithmetic Linux's virtqueue_kick_prepare_packed does in C around the
    header's vring_need_event, over ring sizes, both wrap counters and both off_wrap wraps."""
    from qemuproc.virtio import vring_packed_need_event

    class Q:
        def __init__(self, num: int) -> None:
            self.num = num

    rows = c_results["pneed"]
    assert {r[0] for r in rows} == set(PACKED_NUMS)
    wrong = [r for r in rows
             if vring_packed_need_event(Q(r[0]), bool(r[1]), r[2], r[3], r[4]) != bool(r[5])]
    assert not wrong, f"(num, wrap, off_wrap, new, old, C) where Python differs: {wrong[:10]}"
