"""data.group_by_length (dora_cli/batching.py): a seeded length-grouped order of each epoch.

Properties over drawn lengths, batch sizes and seeds: a permutation (every example exactly once per epoch),
a pure function of (seed, epoch), the same left-over examples as the plain order, and far less padding
than the plain order on a mixed-length set. Through train.Plan: N processes see the micro-batches of one.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_cli import train
from dora_cli.batching import MEGA_BATCHES, length_grouped_order, make_order, seeded_permutation
from dora_cli.recipe import DataConfig

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None)
LENGTHS = st.lists(st.integers(1, 300), min_size=1, max_size=400)


def mixed_lengths(n: int, seed: int = 0) -> list[int]:
    """Short one-line questions next to long passages (ARC next to BoolQ), shuffled."""
    rng = random.Random(seed)
    return [rng.randint(60, 110) if rng.random() < 0.7 else rng.randint(150, 256) for _ in range(n)]


def padded_tokens(order: list[int], lengths: list[int], batch: int, micro: int) -> int:
    """Padding the right-padding collator adds over one epoch's full batches."""
    used = order[: len(order) - len(order) % batch]
    chunks = [used[j : j + micro] for j in range(0, len(used), micro)]
    return sum(len(c) * max(lengths[i] for i in c) - sum(lengths[i] for i in c) for c in chunks)


def test_plain_order_is_pinned():
    """The plain order of every existing run (train.epoch_order before it moved here): a run resumes
    across versions only while these stay."""
    assert seeded_permutation(10, 42, 0) == [8, 4, 0, 7, 5, 2, 6, 1, 9, 3]
    assert seeded_permutation(12, 7, 3) == [6, 5, 7, 10, 4, 11, 0, 8, 3, 9, 1, 2]
    assert hashlib.sha256(str(seeded_permutation(1000, 42, 1)).encode()).hexdigest()[:16] == "27ce3323e37b5502"


@PROPERTY
@given(lengths=LENGTHS, batch=st.integers(1, 40), seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_grouped_order_is_a_pure_permutation(lengths, batch, seed, epoch):
    order = length_grouped_order(lengths, seed, epoch, batch)
    assert sorted(order) == list(range(len(lengths)))
    assert order == length_grouped_order(list(lengths), seed, epoch, batch)
    left = len(lengths) % batch
    assert order[len(order) - left :] == seeded_permutation(len(lengths), seed, epoch)[len(lengths) - left :]


@PROPERTY
@given(lengths=LENGTHS, batch=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_each_chunk_is_grouped(lengths, batch, seed):
    """A global batch is a run of one chunk sorted by length: no length outside the batch lies between its
    shortest and longest example, among the examples of the same chunk."""
    order = length_grouped_order(lengths, seed, 0, batch)
    full = len(lengths) - len(lengths) % batch
    chunk_of = {}
    perm = seeded_permutation(len(lengths), seed, 0)
    for pos, i in enumerate(perm[:full]):
        chunk_of[i] = pos // (batch * MEGA_BATCHES)
    for start in range(0, full, batch):
        members = order[start : start + batch]
        assert len({chunk_of[i] for i in members}) == 1
        lo, hi = min(lengths[i] for i in members), max(lengths[i] for i in members)
        inside = [i for i in chunk_of if chunk_of[i] == chunk_of[members[0]] and i not in members]
        assert all(lengths[i] <= lo or lengths[i] >= hi for i in inside)


def test_epochs_and_seeds_differ():
    lengths = mixed_lengths(2000)
    first = length_grouped_order(lengths, 42, 0, 16)
    assert first != length_grouped_order(lengths, 42, 1, 16)
    assert first != length_grouped_order(lengths, 43, 0, 16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouping_removes_most_padding(seed):
    lengths = mixed_lengths(3000, seed)
    plain = padded_tokens(seeded_permutation(len(lengths), seed, 0), lengths, 16, 4)
    grouped = padded_tokens(length_grouped_order(lengths, seed, 0, 16), lengths, 16, 4)
    assert grouped < 0.1 * plain, (grouped, plain)


def test_make_order_follows_the_recipe():
    lengths = mixed_lengths(100)
    assert make_order(DataConfig(), lengths, 8)(42, 2) == seeded_permutation(100, 42, 2)
    assert make_order(DataConfig(group_by_length=True), lengths, 8)(42, 2) == length_grouped_order(lengths, 42, 2, 8)


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_see_the_micro_batches_of_one(processes):
    """train.Plan over the grouped order."""
    lengths = mixed_lengths(203)
    order = make_order(DataConfig(group_by_length=True), lengths, 16)

    def plan(p: int) -> train.Plan:
        return train.Plan(len(lengths), 16, 2, p, 16 // (2 * p), len(lengths) // 16, 30, 0, order)

    one, many = plan(1), plan(processes)
    for step in range(30):  # more than two epochs
        alone = one.micro_batches(step, 0, seed=42)
        shares = [many.micro_batches(step, rank, seed=42) for rank in range(processes)]
        interleaved = [shares[k % processes][k // processes] for k in range(len(alone))]
        assert interleaved == alone
