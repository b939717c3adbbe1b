"""How tokenised examples become micro-batches: the order of an epoch and the tensors of one micro-batch.

    order   = make_order(recipe.data, lengths, recipe.train.batch_size)   # order(seed, epoch) -> permutation
    collate = make_collate(recipe.data, tokenizer)                        # examples -> model inputs
    check_packing(model, recipe.data)                                     # UserError if packing would leak
    tokens  = real_tokens(batch)                                          # non-padding tokens of a batch

Order. Without `data.group_by_length` an epoch is a seeded permutation of the examples (the order train.py
has always used). With it, the permutation is cut into mega-chunks of `MEGA_BATCHES` global batches, each
chunk is sorted by length (stable: equal lengths keep their random order) and cut into global batches, and
the batches are shuffled with the same seeded generator. Each global batch (and so each micro-batch, a slice
of it) holds examples of similar length; sorting inside a chunk of the random permutation rather than over
the whole set keeps batch composition random from epoch to epoch, and shuffling the batches removes the
long-to-short sweep a sorted chunk would otherwise give. The n mod batch examples an epoch leaves over are
the permutation's last ones, as without grouping. Either order is a pure function of (seed, epoch, lengths):
resume stays bitwise and N processes still see the batches of one.

Packing (`data.packing`). A micro-batch becomes ONE padding-free row [1, Σ lengths]: input_ids and labels
concatenated, position_ids restarting at 0 for each example, and the first label of every example set to
-100, so that no token predicts across a boundary (the first label of an unpacked row is never a target
either). With attention_mask None, transformers (masking_utils.find_packed_sequence_indices) reads the
position restarts and builds a block-diagonal causal mask for SDPA / eager / flex, and flash-attention runs
varlen from the same position_ids. One row and not several rows up to a token budget: it has no padding
at all; it is the one layout flash-attention's packed path accepts (transformers only unpacks batch size 1);
and the micro-batch keeps exactly its examples, so the token-weighted loss is the unpacked one. The cost is
a dense (Σ L)² mask and attention on SDPA, small next to the linear layers at these lengths.

The model must be called with `use_cache=False`: a model in train mode otherwise builds a cache, and with a
cache transformers skips the packed-sequence detection (the examples would see each other).
`check_packing` decides from the model itself whether isolation holds (a probe, not a list of architectures).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dora_cli.datasets import IGNORE_INDEX, make_collator
from dora_cli.errors import UserError
from dora_cli.recipe import DataConfig

MEGA_BATCHES = 50
"""Global batches per length-sorted chunk of the permutation (the mega-batch of HF's LengthGroupedSampler)."""

PROBE_LENGTHS = (6, 5)
"""Token counts of the two examples the packing probe packs into one row."""

LEAK_RATIO = 1e-2
"""A packed example whose logits move by more than this share of a plain concatenation's change leaks."""

Order = Callable[[int, int], list[int]]


# --------------------------------------------------------------------------- the order of an epoch


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def seeded_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The plain order of an epoch: a permutation of range(n) drawn from (seed, epoch)."""
    return torch.randperm(n, generator=_generator(seed, epoch)).tolist()


def length_grouped_order(lengths: Sequence[int], seed: int, epoch: int, batch: int) -> list[int]:
    """A permutation of range(len(lengths)) whose consecutive `batch`-sized slices hold similar lengths.

    The seeded permutation is cut into chunks of MEGA_BATCHES batches, each chunk sorted by length (longest
    first, ties in permutation order) and cut into batches; the batches are shuffled; the n mod batch
    examples left over (the permutation's last ones) come last, where an epoch drops them.
    """
    n = len(lengths)
    g = _generator(seed, epoch)
    perm = torch.randperm(n, generator=g).tolist()
    full = n - n % batch
    batches: list[list[int]] = []
    for start in range(0, full, batch * MEGA_BATCHES):
        chunk = sorted(perm[start : min(full, start + batch * MEGA_BATCHES)], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch] for j in range(0, len(chunk), batch)]
    shuffled = torch.randperm(len(batches), generator=g).tolist()
    return [i for b in shuffled for i in batches[b]] + perm[full:]


def make_order(data: DataConfig, lengths: Sequence[int], batch: int) -> Order:
    """order(seed, epoch) -> the example indices of the epoch, in the order global batches take them
    (remembered for the epoch under way: every step asks, and an epoch of 200k examples takes 0.2 s)."""
    if data.group_by_length:
        frozen = tuple(lengths)
        return functools.lru_cache(maxsize=1)(lambda seed, epoch: length_grouped_order(frozen, seed, epoch, batch))
    n = len(lengths)
    return functools.lru_cache(maxsize=1)(lambda seed, epoch: seeded_permutation(n, seed, epoch))


# --------------------------------------------------------------------------- the tensors of a micro-batch


def pack(examples: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
    """One padding-free row [1, Σ len]: input_ids, labels (each example's first label -100), position_ids."""
    if not examples:
        raise ValueError("cannot pack an empty batch")
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        ids = list(ex["input_ids"])
        own = list(ex.get("labels", ids))
        if own:
            own[0] = IGNORE_INDEX
        input_ids += ids
        labels += own
        positions += range(len(ids))
    row = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    return {key: torch.tensor([values], dtype=torch.long) for key, values in row.items()}


def make_collate(data: DataConfig, tokenizer: Any) -> Callable[[Sequence[dict]], dict[str, torch.Tensor]]:
    """The training collate function: `pack` with data.packing, else the right-padding Collator."""
    return pack if data.packing else make_collator(tokenizer)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of data (not padding) in a batch of either collate function."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


# --------------------------------------------------------------------------- does the model isolate packed examples?


@torch.no_grad()
def packing_leak(model: torch.nn.Module) -> float:
    """How much a packed example's logits depend on the example packed before it (0 when isolated).

    Two random examples a, b are run three ways (eval mode, use_cache=False, as training calls the model):
    b alone, a + b packed (positions restart), a + b concatenated plainly (b sees a). The result is
    max|packed_b - alone_b| / max|plain_b - alone_b|: about 0 (exactly 0 in fp32 / bf16 on the SDPA and
    eager paths) when attention is isolated, about 1 when b sees a. Uses its own generator: the global RNG
    is untouched.
    """
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(vocab, (1, n), generator=g).to(device) for n in PROBE_LENGTHS)
    joined = torch.cat([a, b], dim=1)
    restart = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=b, use_cache=False).logits.float()
        packed = model(input_ids=joined, position_ids=restart, use_cache=False).logits[:, a.shape[1] :].float()
        plain = model(input_ids=joined, use_cache=False).logits[:, a.shape[1] :].float()
    finally:
        model.train(was_training)
    leak = (packed - alone).abs().max().item()
    reach = (plain - alone).abs().max().item()
    return leak / reach if reach > 0 else float(leak > 0)


def check_packing(model: torch.nn.Module, data: DataConfig) -> None:
    """Refuse data.packing for a model whose attention does not isolate packed examples (UserError).
    Every process holds the weights when this runs (FSDP's RAM-efficient loading is refused, launch.py)."""
    if not data.packing:
        return
    ratio = packing_leak(model)
    if not ratio <= LEAK_RATIO:
        config = model.config
        raise UserError(
            f"true is not supported for this model ({config.model_type}, attention "
            f"{config._attn_implementation}): packed examples see each other (a packed example's logits "
            f"move {ratio:.0%} as far as unpacked concatenation would); set data.packing: false",
            where="data.packing",
        )
