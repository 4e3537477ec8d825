"""Give freed tensor memory back to the operating system at once, so peak RSS follows live tensors.

glibc serves allocations above a threshold with their own memory maps, returned on free, but raises
that threshold (up to 32 MB) each time such a block is freed. Calibration frees a decoder layer's
tensors, a few MB each, once per layer; after the first layers they come from the heap, where freed
blocks stay resident and RSS grew by ~30 MB per layer. Fixing the threshold keeps it flat.
"""

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3       # mallopt parameter (glibc malloc.h); setting it also stops the raising
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
