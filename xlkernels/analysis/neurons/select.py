"""Language neurons selected from FFN activation statistics (neurons.stats).

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
    from xlkernels.files import FileError, read_safetensors
    _, flat = read_safetensors(path)
    out: dict[str, dict[int, torch.Tensor]] = {}
    for key, v in flat.items():
        if not key.startswith(prefix + ".") or key.count(".") < 2:
            continue
        lang, l = key[len(prefix) + 1:].rsplit(".", 1)
        if not l.isdigit():
            raise FileError(path, f"tensor {key!r} does not end in a layer number")
        out.setdefault(lang, {})[int(l)] = v
    if not out:
        raise FileError(path, f"holds no '{prefix}.<lang>.<layer>' neuron sets (not a neurons.safetensors?)")
    for lang, d in out.items():
        if sorted(d) != list(range(len(d))):
            raise FileError(path, f"{prefix}.{lang}: layers {sorted(d)} are not 0..{len(d) - 1}")
    return {lang: [d[i] for i in range(len(d))] for lang, d in out.items()}


def as_layer_dict(per_layer: list) -> dict:
    """list[L] LongTensor -> {layer: idx} with the empty layers left out (for steerer.deactivate_neurons)."""
    return {l: idx for l, idx in enumerate(per_layer) if idx.numel()}
