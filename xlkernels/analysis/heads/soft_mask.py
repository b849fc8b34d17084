"""Soft head mask: LAHIS's "20 tunable parameters" (docs/methods.md 1.4, src/lan_head_mask.py).

Only the top-k heads by a language's raw LAHIS score get a trainable gate (init 1.0); every other gate is
fixed at 1. The k trainable values are a Parameter vector scattered into the full (L,H) gate, so nothing
else can change. AdamW (lr 1e-2, weight decay 0.01) on the mean NLL of the answer tokens only (prompt and
padding labels are -100). k defaults to int(L*H*0.02), at least 1 (20 for a 32x32 model).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..tokens import _progress, frozen, pad_id_of, token_nll
from .lahis import top_k_heads


@dataclass
class SoftMask:
    gate: torch.Tensor            # (L,H) float32, detached: give it to steerer.gate or a SteeringPlan
    heads: list                   # flat ids (layer*H + head) of the trainable entries, in parameter order
    values: torch.Tensor          # (k,) trained values
    losses: list = field(default_factory=list)   # mean loss per epoch


def default_k(num_layers: int, num_heads: int, frac: float = 0.02) -> int:
    return max(1, int(num_layers * num_heads * frac))


def qa_batch(tokenizer, pairs, max_length: int = 512, pad_id=None, device="cpu"):
    """(input_ids, attention_mask, labels) for (prompt, answer) pairs: prompt ids as the tokenizer makes
    them, then the answer ids without special tokens; labels are -100 on the prompt and on padding.
    Truncation cuts the prompt's start so the answer survives."""
    pad = pad_id_of(tokenizer) if pad_id is None else pad_id
    rows, labs = [], []
    for prompt, answer in pairs:
        p = list(tokenizer(prompt)["input_ids"])
        a = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        if not a:
            raise ValueError(f"answer {answer!r} has no tokens")
        over = len(p) + len(a) - max_length
        if over > 0:
            p = p[over:]
        rows.append(p + a)
        labs.append([-100] * len(p) + a)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), int(pad), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (r, y) in enumerate(zip(rows, labs)):
        ids[i, :len(r)] = torch.as_tensor(r)
        mask[i, :len(r)] = 1
        labels[i, :len(y)] = torch.as_tensor(y)
    return ids.to(device), mask.to(device), labels.to(device)


def answer_loss(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean NLL over the answer tokens of the batch (the HF `labels=` loss with -100 ignored)."""
    nll, valid = token_nll(model, input_ids, attention_mask, labels)
    return nll.sum() / valid.sum().clamp_min(1)


@torch.no_grad()
def pairs_loss(steerer, tokenizer, pairs, gate=None, batch_size: int = 8, max_length: int = 128) -> float:
    """Mean NLL over all answer tokens of `pairs` with steerer.gate = gate (None: all ones; restored after)."""
    dev = next(steerer.model.parameters()).device
    old, total, count = steerer.gate, 0.0, 0
    steerer.gate = (torch.ones(steerer.num_layers, steerer.num_heads) if gate is None else gate).to(dev, torch.float32)
    try:
        for s in range(0, len(pairs), batch_size):
            ids, mask, labels = qa_batch(tokenizer, pairs[s:s + batch_size], max_length, device=dev)
            nll, valid = token_nll(steerer.model, ids, mask, labels)
            total += float(nll[valid].double().sum())
            count += int(valid.sum())
    finally:
        steerer.gate = old
    return total / max(count, 1)


def scatter_gate(values: torch.Tensor, heads, num_layers: int, num_heads: int) -> torch.Tensor:
    """Full (L,H) gate: ones, with values at the flat ids `heads` (differentiable in values)."""
    idx = torch.as_tensor(list(heads), dtype=torch.long, device=values.device)
    base = torch.ones(num_layers * num_heads, dtype=values.dtype, device=values.device)
    return base.scatter(0, idx, values).view(num_layers, num_heads)


def train_soft_mask(steerer, tokenizer, pairs, *, scores=None, heads=None, k=None, epochs: int = 2,
                    lr: float = 1e-2, weight_decay: float = 0.01, batch_size: int = 1, max_length: int = 512,
                    shuffle: bool = False, seed: int = 0, progress: bool = False) -> SoftMask:
    """Train gates on k heads of a patched model for (prompt, answer) pairs.

    heads: flat ids to train; else the top-k of `scores` (L,H) (k = default_k when None)."""
    L, H = int(steerer.num_layers), int(steerer.num_heads)
    if heads is None:
        if scores is None:
            raise ValueError("give scores (L,H) or heads (flat ids)")
        if tuple(scores.shape) != (L, H):
            raise ValueError(f"scores must have shape ({L}, {H}), got {tuple(scores.shape)}")
        heads = top_k_heads(scores, default_k(L, H) if k is None else k)
    heads = [int(h) for h in heads]
    if not heads or len(set(heads)) != len(heads) or min(heads) < 0 or max(heads) >= L * H:
        raise ValueError(f"heads must be distinct flat ids in [0, {L * H}), got {heads}")
    if not pairs:
        raise ValueError("pairs must not be empty")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    model = steerer.model
    device = next(model.parameters()).device
    values = torch.nn.Parameter(torch.ones(len(heads), dtype=torch.float32, device=device))
    opt = torch.optim.AdamW([values], lr=lr, weight_decay=weight_decay)
    order = list(range(len(pairs)))
    rng = random.Random(seed)
    losses = []
    old_gate = steerer.gate
    try:
        with frozen(model):
            for ep in range(epochs):
                if shuffle:
                    rng.shuffle(order)
                total, n = 0.0, 0
                starts = range(0, len(order), batch_size)
                for s in _progress(starts, progress, total=len(starts), desc=f"soft mask {ep + 1}/{epochs}"):
                    batch = [pairs[i] for i in order[s:s + batch_size]]
                    ids, mask, labels = qa_batch(tokenizer, batch, max_length, device=device)
                    steerer.gate = scatter_gate(values, heads, L, H)
                    loss = answer_loss(model, ids, mask, labels)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                    n += 1
                losses.append(total / n)
    finally:
        steerer.gate = old_gate
    v = values.detach().float()
    return SoftMask(gate=scatter_gate(v, heads, L, H).cpu(), heads=heads, values=v.cpu(), losses=losses)
