"""LAHIS: language attention head importance scores (Liu et al., AAAI-26; docs/methods.md section 1).

One scalar gate per (layer, query head) multiplies the head's attention output before o_proj. The score of
a head for a language is S = (I/N) * (C/N) over N texts, with I the summed |dL/dg|*g and C the number of
texts whose g*dL/dg is negative (raising the gate lowers the loss).

Modes:
- "gradient": the gradient at g = 1 for every text. One forward and one backward per BATCH: the steerer gate
  is a (B,L,H) ones tensor and the loss is the SUM of the per-text mean NLLs, so row b of the gate gradient
  is exactly text b's gradient. Padding is excluded from the loss.
- "paper": the released code (src/attn_matrix.py): batch size 1, an AdamW step (lr 1e-2, weight decay
  0.01) on the mask after every text, so the mask drifts away from 1; I uses the drifted mask and the
  x1000 factor.

The x1000 of the released code only keeps the bf16 sums of tiny gradients representable; it rescales S
by 1000 and changes no ranking or quantile set. "gradient" mode accumulates in float64 and uses
scale=1.0 unless asked.

Head sets (methods.md 1.3): flat id = layer*H + head; a language's list holds the heads with
S > quantile(S, 0.96) in descending S order; heads in the lists of >= min_rep languages are general, the
rest of each list is specific.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch

from ...hf.archs import find_layers
from ..tokens import _progress, encode, frozen, pad_id_of, pad_right, sample_nll

MODES = ("gradient", "paper")


# ---------------------------------------------------------------------------------------------- scores
class LahisAccumulator:
    """Sums I = sum |grad|*gate and C = #(grad*gate < 0) over texts; `scores()` gives (I/N)*(C/N)*scale."""

    def __init__(self, num_layers: int, num_heads: int, scale: float = 1.0):
        self.I = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.C = torch.zeros(num_layers, num_heads, dtype=torch.int64)
        self.N = 0
        self.scale = float(scale)

    def add(self, grad: torch.Tensor, gate: torch.Tensor | None = None):
        """grad: (L,H) for one text or (B,L,H) for B texts; gate: same shape or None (= ones)."""
        grad = grad.detach()
        if grad.dim() == 2:
            grad = grad[None]
        if grad.shape[1:] != self.I.shape:
            raise ValueError(f"grad must have shape (B, {self.I.shape[0]}, {self.I.shape[1]}), "
                             f"got {tuple(grad.shape)}")
        gate = torch.ones_like(grad) if gate is None else gate.detach().expand_as(grad)
        gm = grad * gate
        self.I += (grad.abs() * gate).double().sum(0).cpu()
        self.C += (gm < 0).sum(0).cpu()
        self.N += grad.shape[0]

    def scores(self) -> torch.Tensor:
        if self.N == 0:
            raise ValueError("no texts were scored")
        return ((self.I / self.N) * (self.C.double() / self.N) * self.scale).float()


def _dims(steerer):
    return int(steerer.num_layers), int(steerer.num_heads)


def lahis_scores(steerer, tokenizer, texts, *, mode: str = "gradient", batch_size: int = 8,
                 max_length: int = 256, scale: float | None = None, lr: float = 1e-2,
                 weight_decay: float = 0.01, mask_dtype=None, progress: bool = False) -> torch.Tensor:
    """LAHIS scores (L,H) float32 of one language's texts through a patched model (`xlkernels.patch`).

    mode "gradient": batched gradient at gate 1 (see module doc); scale defaults to 1.
    mode "paper": batch size 1 with the AdamW step on the mask (batch_size is ignored); scale defaults to
    1000 as in the released code; mask_dtype defaults to the model's dtype (bf16 in the paper).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = steerer.model
    device = next(model.parameters()).device
    seqs = encode(tokenizer, texts, max_length)
    if not seqs:
        raise ValueError("texts must hold at least one text of 2 or more tokens")
    L, H = _dims(steerer)
    acc = LahisAccumulator(L, H, scale=(1.0 if mode == "gradient" else 1000.0) if scale is None else scale)
    pad = pad_id_of(tokenizer)
    old_gate = steerer.gate
    try:
        with frozen(model):
            if mode == "gradient":
                starts = range(0, len(seqs), batch_size)
                for s in _progress(starts, progress, total=len(starts), desc="LAHIS"):
                    ids, mask = pad_right(seqs[s:s + batch_size], pad, device)
                    gate = torch.ones(ids.shape[0], L, H, device=device, requires_grad=True)
                    steerer.gate = gate
                    loss = sample_nll(model, ids, mask).sum()
                    (grad,) = torch.autograd.grad(loss, gate)
                    acc.add(grad)
            else:
                dtype = mask_dtype or next(model.parameters()).dtype
                m = torch.nn.Parameter(torch.ones(L, H, dtype=dtype, device=device))
                opt = torch.optim.AdamW([m], lr=lr, weight_decay=weight_decay)
                for s in _progress(seqs, progress, desc="LAHIS (paper)"):
                    ids, mask = pad_right([s], pad, device)
                    steerer.gate = m
                    loss = sample_nll(model, ids, mask)[0]
                    opt.zero_grad()
                    loss.backward()
                    _paper_accumulate(acc, m)
                    opt.step()
    finally:
        steerer.gate = old_gate
    return acc.scores()


def _paper_accumulate(acc: LahisAccumulator, m: torch.Tensor):
    # released code: I += |g| * m * 1000 and C += (g * m < 0), in the mask's dtype; scale applied at the end
    g = m.grad.detach()
    acc.I += (g.abs() * m.detach()).double().cpu()
    acc.C += (g * m.detach() < 0).long().cpu()
    acc.N += 1


# ---------------------------------------------------------------------------------------------- hook path
def decoder_layers(model):
    """The decoder layer list of an HF causal LM (model.model.layers, or a nested language_model)."""
    layers = find_layers(model)
    if layers is None:
        raise ValueError(f"model of type {type(model).__name__} has no decoder layer list")
    return layers


@contextlib.contextmanager
def o_proj_mask(model, mask):
    """The original code's mask as a forward pre-hook on every layer's self_attn.o_proj: the input
    (B,T,H*D) is viewed (B,T,H,D) and multiplied by mask[layer] (H,) per head."""
    layers = decoder_layers(model)
    H = mask.shape[1]
    handles = []
    for l, layer in enumerate(layers):
        def pre(mod, args, l=l):
            x = args[0]
            B, T, HD = x.shape
            y = x.view(B, T, H, HD // H) * mask[l].to(x.dtype).view(1, 1, H, 1)
            return (y.view(B, T, HD),) + tuple(args[1:])
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def lahis_scores_hooked(model, tokenizer, texts, *, mode: str = "gradient", max_length: int = 256,
                        scale: float | None = None, lr: float = 1e-2, weight_decay: float = 0.01,
                        mask_dtype=None, progress: bool = False) -> torch.Tensor:
    """The original approach on an UNPATCHED model: a mask Parameter applied by o_proj pre-hooks,
    one text at a time. Slow reference for tests and the baseline of bench/bench_lahis.py."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = next(model.parameters()).device
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    seqs = encode(tokenizer, texts, max_length)
    if not seqs:
        raise ValueError("texts must hold at least one text of 2 or more tokens")
    acc = LahisAccumulator(L, H, scale=(1.0 if mode == "gradient" else 1000.0) if scale is None else scale)
    dtype = mask_dtype or next(model.parameters()).dtype
    m = torch.nn.Parameter(torch.ones(L, H, dtype=dtype, device=device))
    opt = torch.optim.AdamW([m], lr=lr, weight_decay=weight_decay)
    with frozen(model), o_proj_mask(model, m):
        for s in _progress(seqs, progress, desc="LAHIS (hooks)"):
            ids = torch.as_tensor([s], device=device)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            _paper_accumulate(acc, m)
            if mode == "paper":
                opt.step()
    return acc.scores()


# ---------------------------------------------------------------------------------------------- head sets
def flat_id(layer: int, head: int, num_heads: int) -> int:
    return int(layer) * int(num_heads) + int(head)


def unflat(idx: int, num_heads: int) -> tuple[int, int]:
    return divmod(int(idx), int(num_heads))


def top_heads(scores: torch.Tensor, q: float = 0.96) -> list[int]:
    """Flat ids with S > quantile(S, q) (float64, linear interpolation), by descending S."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    flat = scores.detach().reshape(-1).double().cpu()
    thr = torch.quantile(flat, q)
    idx = (flat > thr).nonzero().reshape(-1)
    order = torch.argsort(flat[idx], descending=True, stable=True)
    return idx[order].tolist()


def top_k_heads(scores: torch.Tensor, k: int) -> list[int]:
    """Flat ids of the k highest raw scores, descending."""
    flat = scores.detach().reshape(-1).double().cpu()
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k must be in [1, {flat.numel()}], got {k}")
    return torch.topk(flat, k).indices.tolist()


def effective_min_rep(min_rep: int, num_langs: int) -> int | None:
    """min_rep clamped to the number of languages: with K < min_rep languages a head must be in all K
    lists to be general; with one language nothing is general (None)."""
    if min_rep < 1:
        raise ValueError(f"min_rep must be >= 1, got {min_rep}")
    if num_langs < 2:
        return None
    return max(2, min(min_rep, num_langs))


def head_sets(scores: dict, q: float = 0.96, min_rep: int = 4) -> dict:
    """Per-language top lists, general heads and specific lists (methods.md 1.3).

    scores: {lang: (L,H)}. Returns {"top": {lang: [ids]}, "general": [ids], "specific": {lang: [ids]},
    "min_rep": effective value, "q": q}. General heads are ordered by how many lists hold them, then by
    first appearance; lists keep descending-score order."""
    if not scores:
        raise ValueError("scores must hold at least one language")
    top = {lang: top_heads(s, q) for lang, s in scores.items()}
    rep = effective_min_rep(min_rep, len(top))
    counts = Counter(i for ids in top.values() for i in ids)
    general = [] if rep is None else [i for i, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c >= rep]
    gen = set(general)
    specific = {lang: [i for i in ids if i not in gen] for lang, ids in top.items()}
    return {"top": top, "general": general, "specific": specific, "min_rep": rep, "q": q}
