"""Language neurons from FFN activation statistics.

- `collect_stats`: one pass over a multilingual corpus, every language in the same stream, each token tagged
  with its language id; the fused GLU counts act>0 per (layer, language, neuron) (LAPE's `over_zero`).
- `lape`: LAPE identification (Tang et al. 2024, RUCAIBox/Language-Specific-Neurons identify.py).
- `classify`: language-specific / language-related / general neurons with the lambda auto-sweep
  (Zhang et al. 2025, NJUNLP/Language-Neurons-Alignment identify.py + autosweep.py).
Probabilities are laid out (L, I, K) as in both papers' code.

Differences from the released code (docs/methods.md 3.2, 4.2):
- float64 throughout (LAPE: float32); ties in the entropy/score ranking may order differently.
- LAPE splits its assignment with bincount, which drops trailing languages that got no neuron; here every
  language always gets its list of L tensors.
- Zhang et al. score only response tokens (full minus prefix pass); here p counts every token of the texts.
  Their calc_entropy clamps p~ at 1e-12 (a change below 1e-10); here 0 log 0 = 0.
- autosweep.py keeps bisecting even when lambda = hi already works and then returns a smaller lambda; here
  hi is returned. Its check `appear[10] == 0` is written for K = 10; here appear[K] == 0.
- "general" neurons (p above the bar in all K languages, any neuron) are our reading of the paper's
  language-agnostic neurons; the released code only reports the appear histogram.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    at most `max_tokens` padded tokens (heads.length_buckets), so short texts share a batch and little padding
    is computed. Deterministic: every shard sees the same batches as one process."""
    from .heads import length_buckets
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
                  max_tokens: int | None = None):
    """Per-language FFN activation statistics over `corpus` ({language: texts}) in one stream.

    Returns a NeuronStats with fields (L, K, I) (K = len(corpus), in the dict's order); `positive` holds LAPE's
    over_zero counts and `tokens` the per-language token counts. Accumulates into `stats` when given.
    bucket (default): texts sorted by length share a batch up to a padded-token budget (heads.token_budget:
    `max_tokens`, else batch_size x max_length, on a CPU at most 512); bucket=False: batch_size texts per
    batch in corpus order (`text_batches`). Both give the same per-token statistics up to float rounding (GEMM
    results depend on the batch shape, so a gate within rounding of 0 can flip its act > 0 count; sums
    differ in the last bits). packing=True: LAPE's packed rows (`packed_batches`)."""
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
        from .heads import token_budget
        budget = token_budget(batch_size, max_length, max_tokens, dev)
        batches, total = bucketed_batches(tokenizer, corpus, budget, max_length, shard=shard), None
    else:
        batches = text_batches(tokenizer, corpus, batch_size, max_length, shard=shard)
    for input_ids, mask, groups in _progress(batches, total, "neuron stats", progress):
        with steerer.record_neurons(groups.to(dev), K, stats=stats) as st:
            _forward(model, input_ids.to(dev), mask.to(dev))
        stats = st
    if stats is None:  # no batch on this shard
        import xlkernels
        stats = xlkernels.NeuronStats.empty(K, steerer.num_neurons, layers=steerer.num_layers)
    return stats


# ---------------------------------------------------------------------------------------------- probabilities


def activation_probs(stats) -> torch.Tensor:
    """LAPE's p[l, j, k] = over_zero_k[l, j] / n_k as float64 (L, I, K), from a NeuronStats with (L, K, I)
    fields (or a (K, I) single layer). Languages with no token get p = 0."""
    pos = stats.positive.double()
    tok = stats.tokens.double()
    if pos.dim() == 2:
        pos = pos.unsqueeze(0)
    if tok.dim() == 1:
        tok = tok.view(*([1] * (pos.dim() - 2)), -1)
    p = pos / tok.clamp_min(1).unsqueeze(-1)
    return p.transpose(-1, -2).contiguous()


def _check_probs(p, name="probs"):
    if not isinstance(p, torch.Tensor) or p.dim() != 3:
        raise ValueError(f"{name} must be a (L, I, K) tensor, got "
                         f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
    if p.shape[-1] < 2:
        raise ValueError(f"{name} needs at least 2 languages (last dim), got {p.shape[-1]}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name} must be finite and >= 0")


def _kth(p: torch.Tensor, ratio: float) -> float:
    """LAPE's threshold: kthvalue(p.flatten(), round(ratio * numel)) (1-based k, clamped to [1, numel])."""
    flat = p.flatten()
    k = min(max(round(flat.numel() * ratio), 1), flat.numel())
    return flat.kthvalue(k).values.item()


def _per_language(assign: torch.Tensor) -> list[list[torch.Tensor]]:
    """(L, I, K) bool -> list[K] of list[L] of sorted LongTensor neuron indices."""
    L, _, K = assign.shape
    return [[assign[l, :, k].nonzero().flatten().long() for l in range(L)] for k in range(K)]


def _flat_select(score: torch.Tensor, top_rate: float) -> torch.Tensor:
    """(L, I) bool mask of the round(top_rate * L*I) smallest scores."""
    n = round(score.numel() * top_rate)
    sel = torch.zeros(score.numel(), dtype=torch.bool)
    if n > 0:
        sel[score.flatten().topk(n, largest=False).indices] = True
    return sel.view(score.shape)


def _check_rate(x, name):
    if not (isinstance(x, (int, float)) and 0 <= x <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")


# ---------------------------------------------------------------------------------------------- LAPE


def lape_entropy(p: torch.Tensor) -> torch.Tensor:
    """LAPE entropy over languages of p~ = p / sum_k p (NaN -> 0), natural log, not divided by log K. (L, I)."""
    pn = p / p.sum(-1, keepdim=True)
    pn = torch.nan_to_num(pn, nan=0.0)
    logp = torch.where(pn > 0, pn.log(), torch.zeros_like(pn))
    return -(pn * logp).sum(-1)


@dataclass
class LapeResult:
    neurons: list            # list[K] of list[L] of LongTensor (neuron ids per layer)
    selected: torch.Tensor   # (L, I) bool, the round(top_rate*L*I) lowest-entropy neurons
    assign: torch.Tensor     # (L, I, K) bool, selected and p > bar
    entropy: torch.Tensor    # (L, I), +inf where no language is above the filter threshold
    filter_value: float      # q95
    bar: float

    def counts(self) -> torch.Tensor:
        """(K, L) number of neurons per language and layer."""
        return self.assign.sum(1).T


def lape(p: torch.Tensor, top_rate: float = 0.01, filter_rate: float = 0.95,
         activation_bar_ratio: float = 0.95) -> LapeResult:
    """LAPE identification, as identify.py: entropy of the normalized activation probabilities; neurons with no
    language above the `filter_rate` quantile of all probabilities are dropped; the round(top_rate*L*I)
    lowest-entropy neurons are assigned to every language whose probability exceeds the `activation_bar_ratio`
    quantile. `p`: (L, I, K) activation probabilities (see `activation_probs`)."""
    _check_probs(p, "p")
    _check_rate(top_rate, "top_rate")
    _check_rate(filter_rate, "filter_rate")
    _check_rate(activation_bar_ratio, "activation_bar_ratio")
    p = p.detach().cpu().double()
    entropy = lape_entropy(p)
    q = _kth(p, filter_rate)
    entropy[(p > q).sum(-1) == 0] = math.inf
    selected = _flat_select(entropy, top_rate)
    bar = _kth(p, activation_bar_ratio)
    assign = selected.unsqueeze(-1) & (p > bar)
    return LapeResult(_per_language(assign), selected, assign, entropy, q, bar)


# ---------------------------------------------------------------------------------------------- ternary


def lna_score(p: torch.Tensor, lam: float) -> torch.Tensor:
    """Zhang et al.'s score H(p~)/log K - lam * max_k p / norm_max, norm_max = (sum_{k<=K} 1/k) / K;
    p~ = p / sum_k p, uniform where the sum is 0. (L, I)."""
    K = p.shape[-1]
    s = p.sum(-1, keepdim=True)
    pn = torch.where(s > 0, p / s.clamp_min(1e-300), torch.full_like(p, 1.0 / K))
    logp = torch.where(pn > 0, pn.log(), torch.zeros_like(pn))
    h = -(pn * logp).sum(-1) / math.log(K)
    norm_max = sum(1.0 / k for k in range(1, K + 1)) / K
    return h - float(lam) * p.amax(-1) / norm_max


def lna_assign(p: torch.Tensor, lam: float, top_rate: float = 0.01, activation_bar_ratio: float = 0.95):
    """(selected (L, I) bool, assign (L, I, K) bool, thr): the round(top_rate*L*I) smallest scores, each assigned
    to every language with p > thr (the `activation_bar_ratio` quantile of all p)."""
    selected = _flat_select(lna_score(p, lam), top_rate)
    thr = _kth(p, activation_bar_ratio)
    return selected, selected.unsqueeze(-1) & (p > thr), thr


def appear_histogram(assign: torch.Tensor) -> list[int]:
    """appear[c] = number of neurons assigned to exactly c languages, c = 0..K (appear[0] counts every neuron
    with no language, selected or not, so it is only informative on a selection)."""
    K = assign.shape[-1]
    return torch.bincount(assign.sum(-1).flatten(), minlength=K + 1).tolist()


def sweep_lambda(p: torch.Tensor, top_rate: float = 0.01, activation_bar_ratio: float = 0.95,
                 lo: float = 0.0, hi: float = 0.2, eps: float = 1e-3, max_iters: int = 64):
    """autosweep.py: bisection on [lo, hi] for the largest lambda whose selection has no neuron assigned to all K
    languages (appear[K] == 0). Returns (lambda or None when no lambda in range works, history
    [(lambda, appear)])."""
    _check_probs(p, "p")
    p = p.detach().cpu().double()
    K = p.shape[-1]
    history = []

    def ok(lam):
        _, assign, _ = lna_assign(p, lam, top_rate, activation_bar_ratio)
        appear = appear_histogram(assign)
        history.append((lam, appear))
        return appear[K] == 0

    ok_lo, ok_hi = ok(lo), ok(hi)
    if ok_hi:  # the largest candidate already works (autosweep.py would keep bisecting; see docs)
        return hi, history
    best = lo if ok_lo else None
    it = 0
    while hi - lo > eps and it < max_iters:
        it += 1
        mid = (lo + hi) / 2.0
        if ok(mid):
            best, lo = mid, mid
        else:
            hi = mid
    return best, history


@dataclass
class NeuronClasses:
    lam: float
    specific: list           # list[K] of list[L] LongTensor: selected, assigned to exactly this one language
    related: list            # list[K] of list[L] LongTensor: selected, assigned to 2..K-1 languages incl. this one
    general: list            # list[L] LongTensor: p > thr for all K languages (any neuron)
    assign: torch.Tensor     # (L, I, K) bool language assignment of the selected neurons
    selected: torch.Tensor   # (L, I) bool
    appear: list             # appear[c], c = 0..K, over the selected neurons
    thr: float
    history: list = field(default_factory=list)

    def counts(self) -> dict:
        """Per-class (K, L) (general: (L,)) neuron counts."""
        n = lambda sets: torch.tensor([[len(x) for x in per_l] for per_l in sets])  # noqa: E731
        return {"specific": n(self.specific), "related": n(self.related),
                "general": torch.tensor([len(x) for x in self.general])}


def classify(p: torch.Tensor, lam: float | str = "auto", top_rate: float = 0.01,
             activation_bar_ratio: float = 0.95, lo: float = 0.0, hi: float = 0.2, eps: float = 1e-3):
    """Language-specific / language-related / general neurons (Zhang et al. 2025).

    lam="auto" runs `sweep_lambda` (falls back to lam=0 when no lambda in [lo, hi] has appear[K] == 0).
    specific = selected neurons assigned to exactly 1 language; related = assigned to 2..K-1 languages;
    general = neurons whose activation probability exceeds the bar in all K languages."""
    _check_probs(p, "p")
    _check_rate(top_rate, "top_rate")
    _check_rate(activation_bar_ratio, "activation_bar_ratio")
    p = p.detach().cpu().double()
    K = p.shape[-1]
    history = []
    if lam == "auto":
        lam, history = sweep_lambda(p, top_rate, activation_bar_ratio, lo, hi, eps)
        if lam is None:
            lam = 0.0
    elif not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number or 'auto', got {lam!r}")
    selected, assign, thr = lna_assign(p, float(lam), top_rate, activation_bar_ratio)
    c = assign.sum(-1)
    spec = assign & (c == 1).unsqueeze(-1)
    rel = assign & ((c >= 2) & (c < K)).unsqueeze(-1)
    general = (p > thr).all(-1)
    L = p.shape[0]
    appear = torch.bincount(c[selected], minlength=K + 1).tolist()
    return NeuronClasses(float(lam), _per_language(spec), _per_language(rel),
                         [general[l].nonzero().flatten() for l in range(L)], assign, selected, appear, thr, history)


# ---------------------------------------------------------------------------------------------- saving


def neuron_sets_tensors(prefix: str, sets: list, langs: list) -> dict:
    """Flatten list[K] of list[L] LongTensor into {f'{prefix}.{lang}.{layer}': idx} for safetensors."""
    return {f"{prefix}.{lang}.{l}": idx.contiguous() for lang, per_l in zip(langs, sets)
            for l, idx in enumerate(per_l)}


def load_neuron_sets(path: str, prefix: str = "lape") -> dict:
    """Read back {lang: list[L] LongTensor} written by `xlkernels neurons` (neurons.safetensors)."""
    from safetensors.torch import load_file
    flat = load_file(path)
    out: dict[str, dict[int, torch.Tensor]] = {}
    for key, v in flat.items():
        if not key.startswith(prefix + ".") or key.count(".") < 2:
            continue
        lang, l = key[len(prefix) + 1:].rsplit(".", 1)
        out.setdefault(lang, {})[int(l)] = v
    return {lang: [d[i] for i in range(len(d))] for lang, d in out.items()}


def as_layer_dict(per_layer: list) -> dict:
    """list[L] LongTensor -> {layer: idx} with the empty layers left out (for steerer.deactivate_neurons)."""
    return {l: idx for l, idx in enumerate(per_layer) if idx.numel()}
