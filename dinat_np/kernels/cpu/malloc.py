"""glibc's malloc thresholds for the CPU backend (raised by ``set_up_process``, see ``threads``).

A forward allocates its activations afresh, tens of MB each at batch 8. By default glibc serves blocks
above a threshold (128 KiB at first, raised up to 32 MiB as such blocks are freed) by fresh mappings,
and gives the heap's free top back to the kernel beyond twice that; every page given back faults in
again, zeroed, the next time it is written: thousands of page faults per forward, at irregular
moments. Blocks up to 64 MiB are therefore served from the heap and up to 128 MiB of free heap kept:
a forward reuses the pages of the one before, and runs faster at batch 8 and 1 alike.

The cost is process-wide: up to 128 MiB that the process freed stays mapped, for reuse by any later
allocation (the peak resident size is unchanged). ``DINAT_NP_MALLOPT=0`` leaves glibc's defaults,
as does a malloc setting of the user's own in the environment (``GLIBC_TUNABLES``, ``MALLOC_*_``).
Other C libraries (musl, macOS, Windows) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameter numbers (<malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 64 << 20
TRIM_THRESHOLD_BYTES = 128 << 20

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _user_chose() -> bool:
    """Whether the environment asks to leave malloc alone or already tunes it."""
    if os.environ.get("DINAT_NP_MALLOPT", "") == "0":
        return True
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(n in os.environ for n in _USER_SETTINGS)


def raise_thresholds() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); True if they were set."""
    if not sys.platform.startswith("linux") or _user_chose():
        return False
    libc = ctypes.CDLL(None)  # the symbols already loaded: the C library the process runs on
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # not glibc
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # both, or glibc's dynamic adjustment (which either setting turns off) would be lost for nothing
    mmap_set = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return mmap_set and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
