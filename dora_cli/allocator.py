"""The C allocator's settings for tensor work: large blocks reused from the heap, not fresh pages each time.

glibc serves a large malloc (from 128 KiB, raised adaptively up to 32 MiB) with its own mmap and gives the
pages back to the kernel on free; the heap's free top is given back too once it passes a threshold. A
training step allocates and frees the same large activations, gradients and temporaries every time, so
each one comes back as fresh pages the kernel must fault in and zero: measured on SmolLM2-135M (2 cores,
bf16 autocast, 6 layers), 15-20 % of a step's wall time, more for the methods with more temporaries (the
same elementwise product took 7.7 ms on fresh pages and under 1 ms on reused ones). With mmap off and
trimming past 1 GiB only, the freed blocks are reused: the peak resident memory is the same (it is the
high-water mark of what is live), the process keeps up to 1 GiB of it after the peak.

`DORA_CLI_MALLOC=system` keeps glibc's defaults; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_BYTES = 1 << 30


def tune_allocator() -> bool:
    """Apply the settings above to this process (glibc only; from now on); whether they were applied."""
    if os.environ.get("DORA_CLI_MALLOC", "").strip().lower() == "system" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
