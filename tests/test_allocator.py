"""dora_cli.allocator: after tune_allocator() a large tensor freed and allocated again reuses its pages (no
page faults), where glibc's defaults map fresh ones each time; DORA_CLI_MALLOC=system keeps the defaults."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

PROBE = r"""
import json, resource, sys
import torch
from dora_cli.allocator import tune_allocator
applied = tune_allocator() if sys.argv[1] == "tune" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # warm up: the heap grows by a few blocks first (small objects split the freed one)
    torch.ones(48 << 20 >> 2)  # 48 MiB: above glibc's largest adaptive mmap threshold (32 MiB)
before = faults()
for _ in range(20):
    torch.ones(48 << 20 >> 2)
print(json.dumps({"applied": applied, "faults_per_alloc": (faults() - before) / 20}))
"""


def _probe(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout)


def test_tuned_allocator_reuses_the_pages_of_a_freed_large_tensor():
    pages = (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    default = _probe("default")
    tuned = _probe("tune")
    assert tuned["applied"] is True
    assert default["faults_per_alloc"] > pages / 2  # the defaults fault the block in every time
    assert tuned["faults_per_alloc"] < pages / 20  # 20 blocks: less than one block's pages in all


def test_system_keeps_glibcs_defaults():
    kept = _probe("tune", DORA_CLI_MALLOC="system")
    assert kept["applied"] is False
    assert kept["faults_per_alloc"] > (48 << 20) // os.sysconf("SC_PAGE_SIZE") / 2


def test_the_command_line_tunes_it(monkeypatch):
    """cli.main applies it before any command runs (the workers of a multi-process launch run cli.main too)."""
    from dora_cli import allocator, cli

    calls = []
    monkeypatch.setattr(allocator, "tune_allocator", lambda: calls.append(1) or True)
    monkeypatch.setattr(sys, "argv", ["dora", "--version"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == [1]
