"""Fill the fork server's partly used allocator pools before it forks supervisors.

CPython's small-object allocator (pymalloc) serves a new object from a *partly used* pool of
its size class first. In a forked supervisor those pools are the fork server's pages, shared
copy-on-write: the first small object the supervisor makes in each of them copies a whole
4 KiB page for a few dozen bytes, and a supervisor makes thousands of objects while it starts.
Filling every partly used pool in the fork server (objects that live as long as it does,
written once, shared by every fork) sends the supervisors' new objects to fresh pools
instead, which they fill densely. Measured with ``bench/density_bench.py --count 100
--network public-only`` (see docs/design.md "Density").

The free blocks per size class come from ``sys._debugmallocstats()`` (CPython's own report,
written to the C stderr): :func:`available_blocks` reads it, a pure function. Where the
report is missing or its shape differs, nothing is filled: the fork server is then exactly
as before.
"""

from __future__ import annotations

import os
import sys

#: Rounds of report-and-fill: a round's own bookkeeping may take or free a few blocks; the
#: next round catches those.
ROUNDS = 3

#: The smallest bytes object's size (its header and trailing NUL) on 64-bit CPython: a
#: ``bytes(n)`` takes a block of the class that holds ``BYTES_OVERHEAD + n``.
BYTES_OVERHEAD = 33

#: A one-digit int's size (28 bytes on 64-bit CPython): the filler of the 32-byte class.
INT_CLASS = 32


def table_rows(report: str) -> list[list[str]]:
    """The rows of the size-class table of a ``sys._debugmallocstats()`` report: class,
    block size, pools, blocks in use, free blocks (five numbers each)."""
    rows = [line.split() for line in report.splitlines()]
    return [r for r in rows if len(r) == 5 and all(f.isdigit() for f in r)]


def available_blocks(report: str) -> list[tuple[int, int]]:
    """(block size, free blocks in partly used pools) per size class of a
    ``sys._debugmallocstats()`` report, for the classes :func:`fill` can fill; [] when the
    report has no size-class table."""
    return _fillable(table_rows(report))


def _fillable(rows: list[list[str]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for row in rows:
        size, avail = int(row[1]), int(row[4])
        if avail > 0 and (size == INT_CLASS or size >= BYTES_OVERHEAD + 1):
            out.append((size, avail))
    return out


def _report() -> str:
    """The allocator's report, read from a memfd that stands in for fd 2 meanwhile."""
    memfd = os.memfd_create("corral-mallocstats", os.MFD_CLOEXEC)
    saved = os.dup(2)
    try:
        os.dup2(memfd, 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
        os.lseek(memfd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(memfd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii", "replace")
    finally:
        os.close(saved)
        os.close(memfd)


def fill() -> list[object]:
    """Fill the partly used pools; returns the fillers, which the caller keeps alive for as
    long as it forks (dropping them would only free the blocks again)."""
    keep: list[object] = []
    if not hasattr(sys, "_debugmallocstats"):
        return keep
    for _ in range(ROUNDS):
        try:
            report = _report()
        except OSError:
            return keep
        # The report, its rows and the counts are kept too: freed, their blocks would be
        # free again in the pools just filled.
        rows = table_rows(report)
        todo = _fillable(rows)
        keep += [report, rows, todo]
        if not todo:
            break
        for size, avail in todo:
            # Each list is made at its full length at once: a list that grew would leave
            # its outgrown small arrays free in the pools.
            fillers: list[object] = [None] * avail
            if size == INT_CLASS:
                for i in range(avail):
                    fillers[i] = 1_000_000 + i  # a new int each (no cache above 256)
            else:
                for i in range(avail):
                    fillers[i] = bytes(size - BYTES_OVERHEAD)
            keep.append(fillers)
    return keep
