"""Per-language FFN neuron statistics over a corpus: `collect_stats` runs one pass over a multilingual corpus,
every language in the same stream, each token tagged with its language id; the fused GLU counts act>0 per
(layer, language, neuron) (LAPE's `over_zero`). Also the batchings it uses (per text, length-bucketed, packed)."""
from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------- batching


def _steerer(obj):
    """A Steerer from a Steerer or an HF model (patched on first use)."""
    if hasattr(obj, "record_neurons"):
        return obj
    import xlkernels
    return xlkernels.patch(obj)


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _check_corpus(corpus, name="corpus", allow_empty=False):
    if not isinstance(corpus, dict) or not corpus:
        raise ValueError(f"{name} must be a non-empty dict {{language: list of texts}}")
    for lang, texts in corpus.items():
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{name}[{lang!r}] must be a list of strings")
        if not texts and not allow_empty:
            raise ValueError(f"{name}[{lang!r}] is empty")


def _interleave(corpus: dict) -> list[tuple[int, str]]:
    """(language id, text) pairs, languages interleaved so every batch mixes languages."""
    lists = list(corpus.values())
    out = []
    for i in range(max(len(t) for t in lists)):
        for k, texts in enumerate(lists):
            if i < len(texts):
                out.append((k, texts[i]))
    return out


def _pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)


def _batch_starts(n: int, batch_size: int, shard):
    rank, world = shard
    return list(range(0, n, batch_size))[rank::world]


def text_batches(tokenizer, corpus: dict, batch_size: int, max_length: int, shard=(0, 1)):
    """Yield (input_ids, attention_mask, group_ids) (B,T) batches mixing languages; right padding, so every
    text sees the same positions as in a batch of one; group_ids = language id, -1 on padding.
    shard=(rank, world): only every world-th batch, from the rank-th (data parallel: same batches as one
    process, so the statistics add up to exactly the single-process ones)."""
    pairs = _interleave(corpus)
    pad = _pad_id(tokenizer)
    for s in _batch_starts(len(pairs), batch_size, shard):
        chunk = pairs[s:s + batch_size]
        ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for _, t in chunk]
        T = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        groups = torch.full((len(ids), T), -1, dtype=torch.long)
        for b, ((k, _), x) in enumerate(zip(chunk, ids)):
            input_ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[b, :len(x)] = 1
            groups[b, :len(x)] = k
        yield input_ids, mask, groups


def bucketed_batches(tokenizer, corpus: dict, max_tokens: int | None, max_length: int, shard=(0, 1)):
    """Like `text_batches`, but the texts (all languages) are sorted by token length and cut into batches of
    at most `max_tokens` padded tokens (tokens.length_buckets), so short texts share a batch and little padding
    is computed. Deterministic: every shard sees the same batches as one process."""
    from ..tokens import length_buckets
    pairs = _interleave(corpus)
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for _, t in pairs]
    pad = _pad_id(tokenizer)
    rank, world = shard
    for idx in length_buckets([len(x) for x in ids], None, max_tokens)[rank::world]:
        T = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        groups = torch.full((len(idx), T), -1, dtype=torch.long)
        for b, i in enumerate(idx):
            n = len(ids[i])
            input_ids[b, :n] = torch.tensor(ids[i], dtype=torch.long)
            mask[b, :n] = 1
            groups[b, :n] = pairs[i][0]
        yield input_ids, mask, groups


def packed_batches(tokenizer, corpus: dict, batch_size: int, max_length: int, shard=(0, 1)):
    """LAPE-style packing: per language, concatenate the tokenized texts and cut them into rows of
    `max_length` tokens (the tail is dropped, unless a language has less than one row)."""
    per_lang = []
    for texts in corpus.values():
        flat = [i for t in texts for i in tokenizer(t)["input_ids"]]
        n = max(len(flat) // max_length * max_length, min(len(flat), max_length))
        per_lang.append([flat[s:s + max_length] for s in range(0, n, max_length)])
    rows = [(k, r) for k, r in _interleave(dict(enumerate(per_lang)))]
    pad = _pad_id(tokenizer)
    for s in _batch_starts(len(rows), batch_size, shard):
        chunk = rows[s:s + batch_size]
        T = max(len(x) for _, x in chunk)
        input_ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        groups = torch.full((len(chunk), T), -1, dtype=torch.long)
        for b, (k, x) in enumerate(chunk):
            input_ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[b, :len(x)] = 1
            groups[b, :len(x)] = k
        yield input_ids, mask, groups


def _num_batches(corpus, batch_size, packing=False, shard=(0, 1)):
    if packing:
        return None
    return len(_batch_starts(sum(len(t) for t in corpus.values()), batch_size, shard))


def _progress(it, total, desc, enabled):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, total=total, desc=desc, unit="batch", leave=False)


def _forward(model, input_ids, mask):
    """Forward for the statistics only: no cache, and logits of the last position only (the LM head of a
    262k vocabulary costs more than the layers of a small model) when the model supports it."""
    try:
        return model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    except TypeError as e:
        if "logits_to_keep" not in str(e):
            raise
        return model(input_ids=input_ids, attention_mask=mask, use_cache=False)


@torch.no_grad()
def collect_stats(steerer_or_model, tokenizer, corpus: dict, batch_size: int = 8, max_length: int = 256,
                  progress: bool = True, packing: bool = False, stats=None, shard=(0, 1), bucket: bool = True,
                  max_tokens: int | None = None, drop_bos: bool = False):
    """Per-language FFN activation statistics over `corpus` ({language: texts}) in one stream.

    Returns a NeuronStats with fields (L, K, I) (K = len(corpus), in the dict's order); `positive` holds LAPE's
    over_zero counts and `tokens` the per-language token counts. Accumulates into `stats` when given.
    bucket (default): texts sorted by length share a batch up to a padded-token budget (tokens.token_budget:
    `max_tokens`, else batch_size x max_length, on a CPU at most 512); bucket=False: batch_size texts per
    batch in corpus order (`text_batches`). Both give the same per-token statistics up to float rounding (GEMM
    results depend on the batch shape, so a gate within rounding of 0 can flip its act > 0 count; sums
    differ in the last bits). packing=True: LAPE's packed rows (`packed_batches`). drop_bos: BOS tokens are not
    counted (they open every short text and act as an attention sink; LAPE's packed 4096-token rows hold few)."""
    _check_corpus(corpus)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    steerer = _steerer(steerer_or_model)
    model = steerer.model
    dev = _input_device(model)
    K = len(corpus)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    total = _num_batches(corpus, batch_size, packing, shard)
    if packing:
        batches = packed_batches(tokenizer, corpus, batch_size, max_length, shard=shard)
    elif bucket:
        from ..tokens import token_budget
        budget = token_budget(batch_size, max_length, max_tokens, dev)
        batches, total = bucketed_batches(tokenizer, corpus, budget, max_length, shard=shard), None
    else:
        batches = text_batches(tokenizer, corpus, batch_size, max_length, shard=shard)
    bos = getattr(tokenizer, "bos_token_id", None) if drop_bos else None
    for input_ids, mask, groups in _progress(batches, total, "neuron stats", progress):
        if bos is not None:
            groups = groups.masked_fill(input_ids == bos, -1)
        with steerer.record_neurons(groups.to(dev), K, stats=stats) as st:
            _forward(model, input_ids.to(dev), mask.to(dev))
        stats = st
    if stats is None:  # no batch on this shard
        import xlkernels
        stats = xlkernels.NeuronStats.empty(K, steerer.num_neurons, layers=steerer.num_layers)
    return stats
