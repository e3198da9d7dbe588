"""``common.vring`` against the kernel's own ``<linux/virtio_ring.h>``, compiled with gcc.

The C program runs ``vring_init`` / ``vring_size`` / ``vring_need_event`` and the
``vring_used_event`` / ``vring_avail_event`` macros on real memory and prints what they give;
the tests hold the Python layout and event arithmetic to exactly those numbers.
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

HEADER = Path("/usr/include/linux/virtio_ring.h")
NUMS = (1, 2, 4, 8, 256, 1024, 32768)
ALIGNS = (4096, 64)
BASE = 0x10000
"""Where the Python layouts are placed: a guest-physical address that is not 0."""

EDGE_U16 = (0, 1, 2, 3, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFD, 0xFFFE, 0xFFFF)

C_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <linux/virtio_ring.h>

static const unsigned nums[] = {%(nums)s};
static const unsigned long aligns[] = {%(aligns)s};
static const unsigned short grid[] = {%(grid)s};

int main(void)
{
    printf("sizes %%zu %%zu\n", sizeof(struct vring_desc), sizeof(struct vring_used_elem));
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
