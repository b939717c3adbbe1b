"""dora_cli.allocator: with tune_allocator() the blocks a step frees together are reused by the next step
(almost no page faults) where glibc's defaults give them back and fault them in again; resident memory
under a hostile mix of sizes stays where the defaults keep it; DORA_CLI_MALLOC chooses, one way or the
other, and anything else is refused."""

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
import json, os, random, resource, sys
import torch
from dora_cli.allocator import tune_allocator
torch.set_num_threads(1)
ran = tune_allocator() if sys.argv[1] == "tune" else "system"
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
def step():  # a step's activations: 6 x 12 MiB live at once (past glibc's largest trim threshold), all freed at its end
    a = torch.ones(12 << 18); b = torch.ones(12 << 18); c = a * b; d = c + a; e = d * b; f = e + c
for _ in range(10):
    step()
before = faults()
for _ in range(20):
    step()
per_step = (faults() - before) / 20
rng, live, kept, peak = random.Random(3), [], [], 0
for _ in range(150):  # 1-100 MiB tensors, 1-4 live, one small tensor kept per step between them
    live.append(torch.ones(rng.randint(1, 100) << 18))
    kept.append(torch.zeros(()))
    while len(live) > rng.randint(1, 4):
        live.pop(rng.randrange(len(live)))
    peak = max(peak, rss_mb())
print(json.dumps({"ran": ran, "faults_per_step": per_step, "peak_rss_mb": peak}))
"""

CLEAN = ("DORA_CLI_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")


def _probe(mode: str, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in CLEAN and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**base, **env})
    return json.loads(out.stdout)


@glibc
def test_a_steps_freed_blocks_are_reused_and_memory_stays_where_the_defaults_keep_it():
    step_pages = 6 * (12 << 20) // os.sysconf("SC_PAGE_SIZE")
    default, tuned = _probe("default"), _probe("tune")
    assert tuned["ran"] == "tuned"
    assert default["faults_per_step"] > step_pages / 10  # the defaults give freed blocks back and fault them in again
    assert tuned["faults_per_step"] < step_pages / 100
    assert tuned["peak_rss_mb"] < 1.2 * default["peak_rss_mb"] + 50  # no heap that only grows (mmap stays on)


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
