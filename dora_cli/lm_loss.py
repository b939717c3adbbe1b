"""The causal-LM loss of a batch, with logits computed only where a label is trained.

    selective = keeps_selected_logits(model)       # once, after the model is built
    keep = trained_positions(labels) if selective else None   # on the host copy of the batch
    total, count = loss_terms(model, batch, keep)
    loss = total / count                           # the mean token loss, what `model(**batch).loss` gives

The LM head is a large share of a small model's step (SmolLM2-135M: a 576 x 49152 GEMM forward and backward,
about a fifth of the step's work) and the cross-entropy over the vocabulary writes several logits-sized
tensors. With `train_on_inputs: false` most positions carry no label (the prompt, the padding), so their
logits are computed and thrown away. Models built on transformers' current causal-LM template take
`logits_to_keep` (an int, or a tensor of sequence positions): the hidden states are computed everywhere as
before, but the head runs on the positions kept. We keep the positions t whose next label (t + 1) is trained
in any row of the batch, take the logits there, and sum the cross-entropy in fp32 like transformers'
`ForCausalLMLoss`. The result is the same loss (up to the order of a float sum) and the same gradients: a
position whose logits were dropped contributed nothing to either. For a packed batch (one row) the kept
positions are exactly the trained ones. A model without `logits_to_keep` gets the full logits.

The positions are found on the host copy of the labels, before the batch moves to the device: finding them
on the device would read back from it (a sync per micro-batch) and, under torch.compile, break the graph at
a data-dependent shape.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from dora_cli.datasets import IGNORE_INDEX


def keeps_selected_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal-LM template)."""
    forward = getattr(model, "forward", None)
    try:
        return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t (over all rows) whose next label labels[:, t + 1] is trained, ascending."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def loss_terms(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token losses in fp32, number of trained tokens) of a batch with `labels`; logits at the
    positions `keep` only (from trained_positions), or everywhere when it is None.

    Every key of `batch` but labels goes to the model (input_ids, attention_mask or position_ids)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if keep is not None:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        targets = labels[:, keep + 1]
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        targets = labels[:, 1:]
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (targets != IGNORE_INDEX).sum()
