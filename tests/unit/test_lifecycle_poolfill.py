"""The fork server's pool filler: the report parser, and that filling leaves no free blocks."""

from __future__ import annotations

import sys

import pytest

from corral.lifecycle import poolfill

REPORT = """Small block threshold = 512, in 32 size classes.

class   size   num pools   blocks in use  avail blocks
-----   ----   ---------   -------------  ------------
    0     16           1              61           960
    1     32           2             712           308
    2     48           7            2063           317
    3     64          32            8124             0
   31    512           1              29             2

# arenas allocated total           =                    3
3 arenas * 1048576 bytes/arena     =            3,145,728
"""


def test_available_blocks_reads_the_size_class_table() -> None:
    # 16 bytes: no filler object fits it; 64: nothing free.
    assert poolfill.available_blocks(REPORT) == [(32, 308), (48, 317), (512, 2)]


@pytest.mark.parametrize("text", ["", "no table here\n", "class size\n1 2 3\n"])
def test_a_report_of_another_shape_fills_nothing(text: str) -> None:
    assert poolfill.available_blocks(text) == []


@pytest.mark.skipif(not hasattr(sys, "_debugmallocstats"), reason="not CPython")
def test_fill_takes_every_block_the_report_found_free() -> None:
    free = sum(n for _, n in poolfill.available_blocks(poolfill._report()))
    assert free > 0, "a running interpreter has partly used pools"
    keep = poolfill.fill()
    fillers = [x for x in keep if isinstance(x, list) and x and isinstance(x[0], int | bytes)]
    # The first round alone fills what the report above counted (give or take the blocks
    # the report's own reading took or freed); later rounds add what was freed meanwhile.
    assert sum(len(f) for f in fillers) >= free * 0.9
    assert all(len(b) + poolfill.BYTES_OVERHEAD in range(48, 513)
               for f in fillers for b in f if isinstance(b, bytes))
