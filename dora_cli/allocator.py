"""The C allocator's settings for tensor work: large freed blocks kept for reuse, not faulted in afresh.

glibc starts by serving every malloc from 128 KiB up with its own mmap, and raises that threshold only as
such blocks are freed (up to 32 MiB); it gives the free top of its heap back to the kernel past 128 KiB,
then past twice the raised threshold. A training step allocates and frees the same activations,
gradients and temporaries every time, many of them live at once: each given back comes again as fresh
pages the kernel must fault in and zero. Here the threshold starts at its 32 MiB maximum and the heap
keeps up to 1 GiB of free top for the next step (blocks above 32 MiB, as the bf16 cast of a large
embedding, still come and go): up to 1 GiB of freed heap more than the defaults stays resident after a
peak (tests/test_allocator.py measures both, and the faults; as under the defaults, a block still in use
above freed ones keeps them from going back). The whole model's floor step
(README, "Against the floor") went from 2.82 to 2.66 s in fp32; in bf16 it did not move (1.30, 1.29).

`DORA_CLI_MALLOC=tuned` (the default) or `system` (glibc's defaults). errors.run_main, the entry of every
command and of `make demo`, applies it; the library used on its own keeps glibc's defaults. Other C
libraries (an LD_PRELOAD-ed jemalloc or tcmalloc included) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

from dora_cli.errors import UserError

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 32 << 20  # glibc's largest (half its 64 MiB heap size)
TRIM_BYTES = 1 << 30
CHOICES = ("tuned", "system")


def tune_allocator() -> str:
    """Apply the settings above to this process from now on, unless DORA_CLI_MALLOC=system; what it runs with:
    "tuned", "system" or why it was left alone. UserError for another DORA_CLI_MALLOC value."""
    choice = os.environ.get("DORA_CLI_MALLOC", "").strip().lower() or "tuned"
    if choice not in CHOICES:
        raise UserError(f"DORA_CLI_MALLOC: expected one of {', '.join(CHOICES)}, got {os.environ['DORA_CLI_MALLOC']!r}")
    if choice == "system":
        return "system"
    if platform.libc_ver()[0] != "glibc":
        return "system: not glibc"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc
        return "system: another allocator is preloaded"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "system: no mallopt"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    refused = [name for name, option, value in (("mmap threshold", M_MMAP_THRESHOLD, MMAP_BYTES),
                                                 ("trim threshold", M_TRIM_THRESHOLD, TRIM_BYTES))
               if not mallopt(option, value)]
    return f"partly tuned: mallopt refused the {' and the '.join(refused)}" if refused else "tuned"
