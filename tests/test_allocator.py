"""dora_cli.allocator: with tune_allocator() the blocks a step frees together are reused by the next step
(almost no page faults) where glibc's defaults give them back and fault them in again; a block above 32 MiB
still goes back to the system when freed, and at most 1 GiB of freed heap is kept; DORA_CLI_MALLOC
chooses, one way or the other, and anything else is refused."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from dora_cli.allocator import tune_allocator
from dora_cli.errors import UserError

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

PROBE = r"""
import ctypes, json, os, resource, sys
import torch
from dora_cli.allocator import tune_allocator
torch.set_num_threads(1)
ran = tune_allocator() if sys.argv[1] == "tune" else "system"
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
if sys.argv[2] == "faults":
    def step():  # a step's activations: 6 x 12 MiB live at once (past glibc's largest trim threshold), all freed at its end
        a = torch.ones(12 << 18); b = torch.ones(12 << 18); c = a * b; d = c + a; e = d * b; f = e + c
    for _ in range(10):
        step()
    before = faults()
    for _ in range(20):
        step()
    per_step = (faults() - before) / 20
    print(json.dumps({"ran": ran, "faults_per_step": per_step}))
else:  # on a fresh heap, C blocks (no tensor's own small allocations between them)
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    def touched(mib):
        block = libc.malloc(mib << 20); ctypes.memset(block, 1, mib << 20); return block
    base = rss_mb()  # a block above the mmap threshold: its own mapping, given back when freed
    big = touched(48); big_mb = rss_mb() - base; libc.free(big); big_kept_mb = rss_mb() - base
    heap = [touched(24) for _ in range(60)]  # 1.4 GiB in blocks below it: the heap, freed top down
    heap_mb = rss_mb() - base
    for block in reversed(heap):
        libc.free(block)
    heap_kept_mb = rss_mb() - base
    print(json.dumps({"ran": ran, "big_mb": big_mb, "big_kept_mb": big_kept_mb, "heap_mb": heap_mb,
                      "heap_kept_mb": heap_kept_mb}))
"""

CLEAN = ("DORA_CLI_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")


def _probe(mode: str, part: str = "faults", **env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in CLEAN and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode, part], capture_output=True, text=True, check=True,
                         env={**base, **env})
    return json.loads(out.stdout)


@glibc
def test_a_steps_freed_blocks_are_reused_and_only_a_bounded_heap_is_kept():
    step_pages = 6 * (12 << 20) // os.sysconf("SC_PAGE_SIZE")
    default, tuned = _probe("default"), _probe("tune")
    assert tuned["ran"] == "tuned"
    assert default["faults_per_step"] > step_pages / 10  # the defaults give freed blocks back and fault them in again
    assert tuned["faults_per_step"] < step_pages / 100
    default, tuned = _probe("default", "memory"), _probe("tune", "memory")
    for run in (default, tuned):
        assert run["big_mb"] >= 40 and run["big_kept_mb"] <= 8, run  # mmap stays on above 32 MiB
        assert run["heap_mb"] >= 1300, run
    assert default["heap_kept_mb"] <= 64, default
    assert 24 <= tuned["heap_kept_mb"] <= 1024 + 32, tuned  # freed heap kept for reuse, trimmed past 1 GiB


@glibc
def test_system_keeps_glibcs_defaults():
    kept = _probe("tune", DORA_CLI_MALLOC=" System ")
    assert kept["ran"] == "system"
    assert kept["faults_per_step"] > 6 * (12 << 20) // os.sysconf("SC_PAGE_SIZE") / 10


@pytest.mark.parametrize("value", ["off", "0", "default", "sytem"])
def test_another_value_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv("DORA_CLI_MALLOC", value)
    with pytest.raises(UserError, match=r"DORA_CLI_MALLOC: expected one of tuned, system, got"):
        tune_allocator()


def test_a_preloaded_allocator_is_left_alone(monkeypatch):
    monkeypatch.delenv("DORA_CLI_MALLOC", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert tune_allocator().startswith("system")


def test_every_entry_point_tunes_it_before_its_body(monkeypatch):
    """errors.run_main, the entry of `dora` (and of every launched worker: they run cli.main) and of `make demo`
    (demo.main), applies it before the command's body; a bad DORA_CLI_MALLOC is one error line with status 2."""
    from dora_cli import allocator, errors

    calls = []
    monkeypatch.setattr(allocator, "tune_allocator", lambda: calls.append("tune") or "tuned")
    errors.run_main(lambda: calls.append("body"))
    assert calls == ["tune", "body"]
    for args in (["dora_cli.cli", "--version"], ["dora_cli.demo", "--recipe", "missing.yaml", "--out", "never-written"]):
        out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                             env={**os.environ, "DORA_CLI_MALLOC": "off"})
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "DORA_CLI_MALLOC" in out.stderr, args
