"""glibc malloc settings for a process that moves multi-megabyte messages.

By default glibc serves every allocation above a (dynamic, at most 32 MB)
threshold with a fresh mmap, and gives it back with munmap: each 10 MB gRPC
message then costs thousands of page faults on the event-loop thread. Keeping
large blocks in the heap lets them be reused. Measured with the demo model
(bench/README.md): float32 InferBatch throughput about 1.6x, the do-nothing
gRPC floor 2x. The price is that a process keeps its peak heap instead of
returning it at once.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


def tune_malloc() -> bool:
    """Apply the settings above; False (and nothing changed) where this is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(
        mallopt(option, value) == 1
        for option, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    if not ok:
        log.warning("mallopt refused the large-message settings; using glibc defaults")
    return ok
