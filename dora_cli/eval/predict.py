"""Batched prediction with a loaded causal LM: beam-search generation, and log-likelihood scoring.

Generation (`generate_batch`)
    Prompts are tokenised one by one (the tokenizer's own special tokens, as at training time) and
    LEFT-padded by hand, with an attention mask; `generate` derives position ids from that mask, so a
    padded row sees the same positions as it would alone. Deterministic beam search (`do_sample=False`)
    with every setting that changes the search given explicitly, so that a model's generation_config
    cannot change it: num_beams, max_new_tokens, length_penalty 1, early_stopping False, no
    repetition penalty. Generation stops at the end-of-sequence token. The text returned is the decoded
    new tokens (up to the first end-of-sequence token, special tokens skipped).
    Speed: `generate` would run every prompt once per beam; the prompts are run once and `generate`
    gets their KV cache, repeated for the beams (same outputs, tested; about 4x less prompt compute).
    That cache is a `BeamLayer` per layer: a buffer sized for the prompt and every new token, written in
    place (transformers' dynamic cache concatenates, copying the whole cache at every new token), whose
    beam reordering moves only the generated positions (the prompt's are the same in every beam of an
    example). On a CPU the two copies were about 40 % of a generation's time.

One answer (`generate_answer`)
    One prompt, greedy or sampled at a temperature (MT-Bench's answers, `dora generate` / `dora chat`):
    the decoded new tokens up to the first end-of-sequence token, special tokens skipped.

Both at once (`generate_and_loglik`)
    The generation's and the log-likelihood's numbers from one pass over the prompts: the prompt cache that
    generation is handed (every prompt but its last token) also serves the candidates, whose own tokens
    (the prompt's last one, then the continuation) run on a copy of it, one row per candidate. The first
    scored token is predicted by the prefill's last logits. The prompt, most of the work of a short
    answer, is run once instead of twice; the scores are loglik_batch's up to float rounding (tested).
    A batch whose prompts tokenise differently alone and followed by a candidate (before their last
    token) is scored by loglik_batch.

The KV cache is passed and read under the name the installed transformers uses (`cache_name`: `cache`
from transformers 5.2x on, `past_key_values` before; the old name is deprecated where the new exists).

Log-likelihood (`loglik_batch`)
    A candidate's score is the summed log-probability of its continuation tokens given the prompt.
    Tokenisation boundary: prompt + continuation is tokenised as ONE string, exactly as the training
    text is, and the continuation tokens are the suffix after the longest common prefix with the
    tokenised prompt alone. When a tokenizer merges the prompt's trailing whitespace into the first
    continuation token, that token is scored (it is what the model was trained to produce there).
    Speed: all candidates of one example share the prompt and the first continuation tokens ("the
    correct answer is"), so each batch runs two forward passes: the shared prefixes of all examples
    (left-padded, logits kept only at the few positions that are scored), then the differing suffixes
    of every candidate on a copy of the prefix's KV cache. `loglik_batch_reference` scores every full
    sequence independently in one forward pass; the tests check that both agree.
"""

from __future__ import annotations

import inspect

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer

from dora_cli.datasets import pad_token_id
from dora_cli.prompts import INSTRUCTION_MARKER

# What LLM-Adapters trains the model to write (`output` of every commonsense record).
CONTINUATION = "the correct answer is {}"


def continuation(label: str) -> str:
    return CONTINUATION.format(label)


def eos_ids_of(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's and the model generation config's (may be a list)."""
    ids: list[int] = []
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for tid in [tokenizer.eos_token_id, *(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])]:
        if tid is not None and int(tid) not in ids:
            ids.append(int(tid))
    return ids


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, max_len] ids and attention mask, padding on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, max_len] ids and attention mask, padding on the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _device(model) -> torch.device:
    return next(model.parameters()).device


def cache_name(model) -> str:
    """The keyword under which the model's forward takes (and its output holds) the KV cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _keep_logits(model, n: int) -> dict:
    """`logits_to_keep=n` (logits of the last n positions only) where the model's forward takes it."""
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.inference_mode()
def generate_batch(
    model, tokenizer, prompts: list[str], *, num_beams: int = 4, max_new_tokens: int = 32, share_prefill: bool = True
) -> list[str]:
    """The decoded continuation of each prompt, by deterministic beam search over a left-padded batch.

    `share_prefill`: run the prompt once per example and give `generate` its KV cache, repeated for
    the beams (see `_prefill`); False leaves the whole prompt to `generate`.
    """
    config, eos = _generation_config(model, tokenizer, num_beams, max_new_tokens)
    ids, mask = left_pad([encode(tokenizer, p) for p in prompts], pad_token_id(tokenizer))
    device = _device(model)
    ids, mask = ids.to(device), mask.to(device)
    cache = None
    if share_prefill and num_beams > 1 and ids.shape[1] > 1:
        cache = _beam_cache(_prefill(model, ids, mask)[0], num_beams, room=max_new_tokens + 1)
    return _generate(model, tokenizer, ids, mask, config, eos, cache)


def _generation_config(model, tokenizer, num_beams: int, max_new_tokens: int) -> tuple[GenerationConfig, list[int]]:
    pad = pad_token_id(tokenizer)
    eos = eos_ids_of(model, tokenizer)
    config = GenerationConfig(
        do_sample=False, num_beams=num_beams, num_return_sequences=1, max_new_tokens=max_new_tokens,
        length_penalty=1.0, early_stopping=False, repetition_penalty=1.0, no_repeat_ngram_size=0,
        temperature=1.0, top_p=1.0, top_k=50,
        eos_token_id=eos or None, pad_token_id=pad,
    )
    return config, eos


def _generate(model, tokenizer, ids, mask, config, eos: list[int], cache) -> list[str]:
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **{cache_name(model): cache})
    texts = []
    for row in out[:, ids.shape[1]:].tolist():  # [batch, new tokens]
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor):
    """(KV cache of every left-padded prompt but its last token, the logits at that last cached position
    [batch, vocab]): what `generate` would compute first, run once per prompt.

    `generate` copies each prompt `num_beams` times before its first forward pass, so the prompt
    (most of the compute of a 32-token answer) would be run num_beams times. Here it runs once;
    `generate` then finds the prompt cached and runs only its last token, on every beam. Position ids
    are the ones `generate` derives from the attention mask.
    """
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(
        input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
        use_cache=True, **_keep_logits(model, 1),
    )
    return getattr(out, cache_name(model)), out.logits[:, -1]


def _beam_cache(cache, num_beams: int, room: int):
    """The prefilled cache repeated for each beam, with `room` more positions in every layer (BeamLayer);
    None when the cache cannot be repeated (then `generate` does it all)."""
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(num_beams)  # rows b*num_beams .. b*num_beams+beams-1 are example b
    layers = _dynamic_layers(cache)
    if layers:
        cache.layers = [BeamLayer.of(layer, room) for layer in layers]
    return cache


def _dynamic_layers(cache) -> list | None:
    """The cache's layers when every one is a filled transformers DynamicLayer (what BeamLayer and the
    candidates' copy are made from), else None."""
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers):
        return layers
    return None


class BeamLayer(DynamicLayer):
    """One layer's KV cache for beam search over prompts cached once: a buffer of room for every position
    of the search, filled in place, and a beam reordering that moves the generated positions only.

    Beam search reorders rows within an example (beam b of example e takes the history of another beam
    of e), and the first `shared` positions (the prefilled prompt) are equal in every beam of an example,
    so reordering them would copy them onto themselves. `keys` / `values` are views of the filled part,
    holding the same numbers a concatenating cache would.
    """

    @classmethod
    def of(cls, layer: DynamicLayer, room: int) -> BeamLayer:
        new = cls()
        new.lazy_initialization(layer.keys, layer.values)
        rows, heads, length, dim = layer.keys.shape
        new.key_buffer = layer.keys.new_empty(rows, heads, length + room, dim)
        new.value_buffer = layer.values.new_empty(rows, heads, length + room, layer.values.shape[-1])
        new.key_buffer[:, :, :length] = layer.keys
        new.value_buffer[:, :, :length] = layer.values
        new.shared = new.length = length
        new._expose()
        return new

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:  # more than was planned for: grow as the dynamic cache does
            self.key_buffer = torch.cat([self.keys, key_states], dim=-2)
            self.value_buffer = torch.cat([self.values, value_states], dim=-2)
        else:
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length > self.shared:
            idx = beam_idx.to(self.key_buffer.device)
            for buffer in (self.key_buffer, self.value_buffer):
                tail = buffer[:, :, self.shared : self.length]
                tail.copy_(tail.index_select(0, idx))

    def crop(self, tokens_to_remove: int) -> None:  # not used by beam search
        raise NotImplementedError("BeamLayer cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("BeamLayer is made after the repeat")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("BeamLayer rows are beams: select before making it")


@torch.inference_mode()
def generate_and_loglik(
    model, tokenizer, prompts: list[str], candidates: list[tuple[str, ...]], *, num_beams: int = 4,
    max_new_tokens: int = 32,
) -> tuple[list[str], list[dict[str, float]]]:
    """generate_batch's texts and loglik_batch's scores, the prompts run once for both (see the module)."""
    config, eos = _generation_config(model, tokenizer, num_beams, max_new_tokens)
    pad = pad_token_id(tokenizer)
    prompt_ids = [encode(tokenizer, p) for p in prompts]
    tokenized = [_tokenize_candidates(tokenizer, p, labels) for p, labels in zip(prompts, candidates)]
    # Every candidate must extend its prompt's tokens up to the last one, which it scores from the prefill's
    # last logits on (a tokenizer may merge the prompt's end into the continuation: then the old way).
    fits = all(
        len(ids) > 1 and all(f[: len(ids) - 1] == ids[:-1] and start >= len(ids) - 1 for f, start in zip(*tok))
        for ids, tok in zip(prompt_ids, tokenized)
    )
    if not fits or num_beams < 2:
        return (generate_batch(model, tokenizer, prompts, num_beams=num_beams, max_new_tokens=max_new_tokens),
                loglik_batch(model, tokenizer, prompts, candidates))
    device = _device(model)
    ids, mask = left_pad(prompt_ids, pad)
    ids, mask = ids.to(device), mask.to(device)
    cache, last_logits = _prefill(model, ids, mask)
    layers = _dynamic_layers(cache)
    if not layers:
        return (_generate(model, tokenizer, ids, mask, config, eos, _beam_cache(cache, num_beams, max_new_tokens + 1)),
                loglik_batch(model, tokenizer, prompts, candidates))
    prompt_kv = [(layer.keys, layer.values) for layer in layers]  # the repeat for the beams makes new tensors
    scores = _score_on_prefill(model, prompt_ids, tokenized, candidates, prompt_kv, mask, last_logits, pad)
    texts = _generate(model, tokenizer, ids, mask, config, eos, _beam_cache(cache, num_beams, max_new_tokens + 1))
    return texts, scores


def _score_on_prefill(model, prompt_ids, tokenized, candidates, prompt_kv, mask, last_logits, pad) -> list[dict[str, float]]:
    """Every candidate's log-likelihood: its tokens from the prompt's last one on, on a copy of its
    example's cached prompt (one row per candidate); the first of them scored from the prefill's logits."""
    device = mask.device
    owner, suffixes = [], []
    for e, (ids, (fulls, _)) in enumerate(zip(prompt_ids, tokenized)):
        for f in fulls:
            owner.append(e)
            suffixes.append(f[len(ids) - 1:])
    owner_t = torch.tensor(owner, dtype=torch.long, device=device)
    cache = DynamicCache(ddp_cache_data=[(k.index_select(0, owner_t), v.index_select(0, owner_t)) for k, v in prompt_kv])
    suf_ids, suf_mask = right_pad(suffixes, pad)
    start = torch.tensor([len(prompt_ids[e]) - 1 for e in owner], dtype=torch.long)
    out = model(
        input_ids=suf_ids.to(device),
        attention_mask=torch.cat([mask[owner_t, :-1], suf_mask.to(device)], dim=1),
        position_ids=(start[:, None] + torch.arange(suf_ids.shape[1])[None, :]).to(device),
        use_cache=True,
        **{cache_name(model): cache},
    )
    suffix_logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # [candidates, suffix len, vocab]
    first_logprobs = torch.log_softmax(last_logits.float(), dim=-1)  # [examples, vocab]: predicts token P - 1
    scores, row = [], 0
    for e, (ids, (fulls, starts)) in enumerate(zip(prompt_ids, tokenized)):
        p = len(ids)
        result = {}
        for label, f, first in zip(candidates[e], fulls, starts):
            total = 0.0
            for t in range(first, len(f)):  # log p(f[t] | f[:t])
                total += float(first_logprobs[e, f[t]] if t == p - 1 else suffix_logprobs[row, t - p, f[t]])
            result[label] = total
            row += 1
        scores.append(result)
    return scores


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenize_candidates(tokenizer, prompt: str, labels: tuple[str, ...]) -> tuple[list[list[int]], list[int]]:
    """Full token ids of prompt + each continuation, and where each continuation starts."""
    prompt_ids = encode(tokenizer, prompt)
    fulls = [encode(tokenizer, prompt + continuation(c)) for c in labels]
    starts = [max(1, min(_common_prefix(prompt_ids, f), len(f) - 1)) for f in fulls]
    return fulls, starts


@torch.inference_mode()
def loglik_batch_reference(model, tokenizer, prompts: list[str], candidates: list[tuple[str, ...]]) -> list[dict[str, float]]:
    """Log-likelihood of every candidate, each full sequence scored on its own row (one forward pass)."""
    pad = pad_token_id(tokenizer)
    rows, starts, owners = [], [], []
    for i, (prompt, labels) in enumerate(zip(prompts, candidates)):
        fulls, st = _tokenize_candidates(tokenizer, prompt, labels)
        rows += fulls
        starts += st
        owners += [(i, c) for c in labels]
    ids, mask = right_pad(rows, pad)
    device = _device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [rows, T, vocab]
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
    scores: list[dict[str, float]] = [{} for _ in prompts]
    for r, (i, c) in enumerate(owners):
        scores[i][c] = float(logprobs[r, starts[r] - 1 : len(rows[r]) - 1].sum())
    return scores


@torch.inference_mode()
def loglik_batch(model, tokenizer, prompts: list[str], candidates: list[tuple[str, ...]]) -> list[dict[str, float]]:
    """Log-likelihood of every candidate continuation: shared prefixes once, then all suffixes together."""
    pad = pad_token_id(tokenizer)
    device = _device(model)

    # Per example: full sequences, continuation starts, and the shared prefix length s (every candidate
    # keeps at least one token of its own after s).
    examples = []
    for prompt, labels in zip(prompts, candidates):
        fulls, starts = _tokenize_candidates(tokenizer, prompt, labels)
        shared = min(min(_common_prefix(fulls[0], f) for f in fulls), min(len(f) for f in fulls) - 1)
        shared = max(shared, 1)
        examples.append((labels, fulls, starts, shared))

    # Pass 1: the shared prefixes, left-padded; logits only where a scored token is predicted.
    prefixes = [fulls[0][:s] for _, fulls, _, s in examples]
    ids, mask = left_pad(prefixes, pad)
    width = ids.shape[1]
    keep = max(s - min(starts) + 1 for _, _, starts, s in examples)  # positions s-keep .. s-1
    keep = min(max(keep, 1), width)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
        use_cache=True, **_keep_logits(model, keep),
    )
    prefix_logprobs = torch.log_softmax(out.logits[:, -keep:].float(), dim=-1)  # [examples, keep, vocab]
    cache = getattr(out, cache_name(model))

    # Pass 2: every candidate's own tokens after the shared prefix, on its example's cached prefix.
    suffixes, owner = [], []
    for e, (_, fulls, _, s) in enumerate(examples):
        for f in fulls:
            suffixes.append(f[s:])
            owner.append(e)
    owner_t = torch.tensor(owner, dtype=torch.long)
    cache.batch_select_indices(owner_t.to(device))
    suf_ids, suf_mask = right_pad(suffixes, pad)
    prefix_len = torch.tensor([len(p) for p in prefixes], dtype=torch.long)
    suf_pos = prefix_len[owner_t, None] + torch.arange(suf_ids.shape[1])[None, :]
    out2 = model(
        input_ids=suf_ids.to(device),
        attention_mask=torch.cat([mask[owner_t], suf_mask], dim=1).to(device),
        position_ids=suf_pos.to(device),
        use_cache=True,
        **{cache_name(model): cache},
    )
    suffix_logprobs = torch.log_softmax(out2.logits.float(), dim=-1)  # [candidates, suffix len, vocab]

    scores: list[dict[str, float]] = []
    row = 0
    for e, (labels, fulls, starts, s) in enumerate(examples):
        result = {}
        for label, f, start in zip(labels, fulls, starts):
            total = 0.0
            for t in range(start, len(f)):  # log p(f[t] | f[:t])
                if t <= s:  # predicted from the prefix pass: logits of position t-1, kept as index keep-(s-(t-1))
                    total += float(prefix_logprobs[e, keep - 1 - (s - t), f[t]])
                else:  # predicted from the suffix pass: logits of suffix position t-1-s
                    total += float(suffix_logprobs[row, t - 1 - s, f[t]])
            result[label] = total
            row += 1
        scores.append(result)
    return scores


@torch.inference_mode()
def answer_turn(model, tokenizer, prompt: str, add_special_tokens: bool, *, temperature: float, max_new_tokens: int) -> str:
    """One answer: greedy below temperature 1e-4, else sampling at `temperature` (seed torch before the call).

    With the Alpaca / LLM-Adapters text (`add_special_tokens`), an answer is cut where the model starts a new
    "### Instruction:" turn itself.
    """
    ids = tokenizer(prompt, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
    eos = eos_ids_of(model, tokenizer)
    sample = temperature >= 1e-4
    config = GenerationConfig(
        do_sample=sample, num_beams=1, max_new_tokens=max_new_tokens,
        eos_token_id=eos or None, pad_token_id=pad_token_id(tokenizer),
        **({"temperature": temperature} if sample else {}),
    )
    device = _device(model)
    out = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), generation_config=config)
    new = out[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(new) if t in eos), len(new))
    text = tokenizer.decode(new[:cut], skip_special_tokens=True)
    if add_special_tokens and INSTRUCTION_MARKER in text:
        text = text[: text.index(INSTRUCTION_MARKER)]
    return text.strip()


def describe_model(model) -> str:
    """One line: class, where it was loaded from, parameter count, dtype (for the metrics' settings)."""
    config = getattr(model, "config", None)
    source = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or "random init"
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    dtype = str(params[0].dtype).removeprefix("torch.") if params else "?"
    return f"{type(model).__name__} {source} ({n / 1e6:.2f}M parameters, {dtype})"
