"""A training worker's C heap: what it keeps of the memory it frees."""

import contextlib
import ctypes

# glibc's mallopt parameter for the size from which allocations are mapped on their own (and unmapped when freed).
M_MMAP_THRESHOLD = -3


def compact_memory() -> None:
    """Map every allocation of 1 MiB or more on its own, for the rest of this process (glibc; nothing elsewhere).

    glibc otherwise raises that size as large blocks are freed, up to 32 MiB, and serves smaller blocks from its heap:
    the pieces a ZeRO engine's set-up and steps free (weights as built, zero.Init's partitions, gathered layers,
    gradient copies) then stay in the process beside what it keeps. A fixed threshold returns them at once, at the
    price of a fresh page for every large allocation.
    """
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 2**20)
