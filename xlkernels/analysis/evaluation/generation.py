"""Batched greedy generation and the measures on its tokens, for the evaluation harness (evaluate.py)."""
from __future__ import annotations

import contextlib
import time

import torch

from ..tokens import pad_id_of, token_nll


def steerer_of(model):
    """(steerer, HF model) for a patched steerer or a plain HF model (patched here)."""
    import xlkernels
    if all(hasattr(model, a) for a in ("model", "num_layers", "reset")):
        return model, model.model
    return xlkernels.patch(model), model


def repetition_rate(seqs, n: int = 3) -> float:
    """Mean over sequences with >= n tokens of the fraction of n-grams seen earlier in the same sequence."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    vals = []
    for s in seqs:
        s = list(s)
        grams = [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
        if grams:
            vals.append(1.0 - len(set(grams)) / len(grams))
    return sum(vals) / len(vals) if vals else 0.0


def _eos_ids(model, tok) -> set:
    ids = set()
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tok.eos_token_id):
        if v is not None:
            ids.update(v if isinstance(v, (list, tuple)) else [v])
    return {int(i) for i in ids}


def _cut(row, eos) -> list:
    out = []
    for t in row:
        if t in eos:
            break
        out.append(t)
    return out


@contextlib.contextmanager
def _left_padding(tok):
    side = getattr(tok, "padding_side", "right")
    tok.padding_side = "left"
    try:
        yield
    finally:
        tok.padding_side = side


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens: int, batch_size: int = 16, steer=None, **gen_kw):
    """Batched generation, greedy unless gen_kw says otherwise (e.g. do_sample=True, temperature=0.7): (generated
    ids per prompt, cut at EOS; seconds). steer(batch) -> context manager active while a batch generates (its
    set-up time counts) that may yield extra generate() keyword arguments, or None."""
    eos, pad = _eos_ids(model, tok), pad_id_of(tok)
    dev = _device(model)
    outs, secs = [], 0.0
    for s in range(0, len(prompts), batch_size):
        with _left_padding(tok):
            enc = tok(list(prompts[s:s + batch_size]), return_tensors="pt", padding=True)
        batch = {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev)}
        t0 = time.perf_counter()
        with (steer(batch) if steer else contextlib.nullcontext()) as extra:
            kw = dict(do_sample=False, num_beams=1, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            kw.update(gen_kw, **(extra or {}))
            out = model.generate(**batch, max_new_tokens=max_new_tokens, **kw)
        secs += time.perf_counter() - t0
        T = batch["input_ids"].shape[1]
        outs += [_cut(r, eos) for r in out[:, T:].tolist()]
    return outs, secs


@torch.no_grad()
def generated_nll(model, tok, prompts, generated, batch_size: int = 16):
    """(summed NLL, token count) of the generated tokens after their prompts under the model as it is now."""
    pad = pad_id_of(tok)
    dev = _device(model)
    seqs = []
    for p, g in zip(prompts, generated):
        ids = tok(p)["input_ids"]
        seqs.append((list(ids), list(g)))
    total, count = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))  # less padding
    for s in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[s:s + batch_size] if seqs[i][1]]
        if not chunk:
            continue
        T = max(len(a) + len(b) for a, b in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (a, b) in enumerate(chunk):
            n = len(a) + len(b)
            ids[r, :n] = torch.as_tensor(a + b)
            mask[r, :n] = 1
            labels[r, len(a):n] = torch.as_tensor(b)
        nll, valid = token_nll(model, ids.to(dev), mask.to(dev), labels.to(dev))
        total += float(nll[valid].double().sum())
        count += int(valid.sum())
    return total, count
