"""CLAIM-style language shift vectors on attention heads (Ye, Li et al., ACL 2025; docs/methods.md 2.2).

Direction: S[l,h] = mean_tgt(o[l,h]) - mean_src(o[l,h]) over parallel prompts, with o the raw per-head
attention output (before gate/shift and o_proj) at the last token (or the mean over a text's tokens).
Adding alpha*S to a source-language input's head outputs moves it toward the target language. CLAIM's
"from English to the target language" with S = mean_en - mean_l is this with src = l, tgt = en.

Heads are selected per language by the held-out accuracy of a per-head probe that separates the two
languages (logistic regression or nearest centroid, all heads trained at once in torch), or by importance
scores (LAHIS), keeping the top k; the shift is alpha*S on those heads and zero elsewhere.
Deviations from CLAIM (an LVLM method): it probes the "cross-modal" output (attention renormalised over
image tokens) with an SVM; text-only LLMs have no image tokens, so the probe sees the plain head output,
and the SVM is replaced by torch logistic regression / nearest centroid (balanced held-out accuracy).

A shift bank holds K languages relative to a pivot (one language, or "mean" = the mean of the K
language means): bank[k] = mask_k * (mean_k - mean_pivot), shape (K,L,H,D). The steerer adds
alpha*bank[ids[b]] to sample b (`steerer.set_shift_bank` + `select_languages`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..tokens import _progress, encode, pad_id_of, pad_right

POSITIONS = ("last", "mean")
PROBES = ("logistic", "centroid")


# ---------------------------------------------------------------------------------------------- capture
@torch.no_grad()
def head_outputs(steerer, tokenizer, texts, *, position: str = "last", batch_size: int = 8,
                 max_length: int = 128, progress: bool = False) -> torch.Tensor:
    """Per-head raw attention outputs (N,L,H,D) float32 on CPU for N texts through a patched model.

    Both read steerer.capture_heads (raw outputs, before that head's gate/shift).
    position "last": at each text's last token, of the model AS STEERED NOW, so steering of earlier layers
    shows; call steerer.reset() first for the plain model. "mean": the mean over the text's real tokens
    (capture_heads("all", attention_mask), averaged inside the attention function) under
    steerer.unsteered(), i.e. always the plain model."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = steerer.model
    device = next(model.parameters()).device
    seqs = encode(tokenizer, texts, max_length)
    if len(seqs) != len(texts):
        raise ValueError("every text must have at least 2 tokens")
    pad = pad_id_of(tokenizer)
    out = []
    starts = range(0, len(seqs), batch_size)
    for s in _progress(starts, progress, total=len(starts), desc="head outputs"):
        ids, mask = pad_right(seqs[s:s + batch_size], pad, device)
        if position == "last":
            state, cap_ctx = contextlib.nullcontext(), steerer.capture_heads(positions=mask.sum(1) - 1)
        else:
            state, cap_ctx = steerer.unsteered(), steerer.capture_heads(positions="all", mask=mask)
        with state, cap_ctx as cap:
            model(input_ids=ids, attention_mask=mask)
        out.append(cap.outputs.float().permute(1, 0, 2, 3).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- vectors
def shift_vector(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """S = mean_tgt - mean_src (L,H,D) from outputs (N,L,H,D); adding alpha*S moves src toward tgt."""
    if src.dim() != 4 or tgt.dim() != 4 or src.shape[1:] != tgt.shape[1:]:
        raise ValueError(f"src and tgt must be (N,L,H,D) with equal L,H,D, got {tuple(src.shape)}, "
                         f"{tuple(tgt.shape)}")
    return tgt.double().mean(0).float() - src.double().mean(0).float()


def split_indices(n: int, train_frac: float = 0.75, seed: int = 0):
    """Deterministic train/test split of n aligned prompt ids (translations stay on the same side)."""
    if n < 2:
        raise ValueError(f"need at least 2 prompts per language to split, got {n}")
    if not 0.0 < train_frac < 1.0:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(max(1, int(round(n * train_frac))), n - 1)
    return perm[:k], perm[k:]


def _balanced_acc(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """pred (N,L,H) bool, y (N,) bool -> mean of the two class recalls (L,H)."""
    yb = y.view(-1, 1, 1)
    pos = (pred & yb).sum(0).double() / yb.sum().clamp_min(1)
    neg = (~pred & ~yb).sum(0).double() / (~yb).sum().clamp_min(1)
    return ((pos + neg) / 2).float()


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, test: torch.Tensor, *,
                   method: str = "logistic", steps: int = 200, lr: float = 0.05,
                   weight_decay: float = 1e-3) -> torch.Tensor:
    """Held-out balanced accuracy (L,H) of a per-head binary probe on x (N,L,H,D), labels y (N,) bool.

    "centroid": nearest class mean. "logistic": logistic regression on features standardized with the
    train statistics, all heads at once (independent weights, full-batch Adam, L2 weight_decay)."""
    if method not in PROBES:
        raise ValueError(f"method must be one of {PROBES}, got {method!r}")
    if x.dim() != 4 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N,L,H,D) and y (N,), got {tuple(x.shape)}, {tuple(y.shape)}")
    y = y.bool()
    x = x.float()
    xtr, ytr, xte, yte = x[train], y[train], x[test], y[test]
    if ytr.all() or not ytr.any():
        raise ValueError("the train split must hold both classes")
    if method == "centroid":
        m1, m0 = xtr[ytr].mean(0), xtr[~ytr].mean(0)
        d1 = (xte - m1).pow(2).sum(-1)
        d0 = (xte - m0).pow(2).sum(-1)
        return _balanced_acc(d1 < d0, yte)
    mu, sd = xtr.mean(0), xtr.std(0, unbiased=False).clamp_min(1e-6)
    ztr, zte = (xtr - mu) / sd, (xte - mu) / sd
    _, L, H, D = x.shape
    w = torch.zeros(L, H, D, requires_grad=True)
    b = torch.zeros(L, H, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    t = ytr.float().view(-1, 1, 1).expand(-1, L, H)
    # balance the classes so a one-vs-rest probe does not learn the prior
    cw = torch.where(ytr, 0.5 / ytr.float().mean(), 0.5 / (1 - ytr.float().mean())).view(-1, 1, 1)
    with torch.enable_grad():
        for _ in range(steps):
            logit = (ztr * w).sum(-1) + b
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logit, t, reduction="none") * cw)
            loss = loss.mean(0).sum() + weight_decay * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = ((zte * w).sum(-1) + b) > 0
    return _balanced_acc(pred, yte)


def pair_probe(src: torch.Tensor, tgt: torch.Tensor, *, method: str = "logistic", train_frac: float = 0.75,
               seed: int = 0, **kw) -> torch.Tensor:
    """Held-out accuracy (L,H) of separating aligned src/tgt outputs (N,L,H,D); split by prompt id."""
    if src.shape != tgt.shape:
        raise ValueError(f"src and tgt must be aligned (same shape), got {tuple(src.shape)}, {tuple(tgt.shape)}")
    n = src.shape[0]
    tr, te = split_indices(n, train_frac, seed)
    x = torch.cat([src, tgt])
    y = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    return probe_accuracy(x, y, torch.cat([tr, tr + n]), torch.cat([te, te + n]), method=method, **kw)


def default_k(num_layers: int, num_heads: int, frac: float = 0.05) -> int:
    return max(1, int(num_layers * num_heads * frac))


def head_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (L,H) mask of the k highest scores (ties broken by lower flat id)."""
    L, H = scores.shape
    if not 1 <= k <= L * H:
        raise ValueError(f"k must be in [1, {L * H}], got {k}")
    flat = scores.detach().reshape(-1).double().cpu()
    order = torch.argsort(-flat, stable=True)[:k]
    m = torch.zeros(L * H, dtype=torch.bool)
    m[order] = True
    return m.view(L, H)


def masked_shift(S: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """alpha*S on the heads where mask (L,H) is True, zero elsewhere."""
    if mask.shape != S.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(S.shape[:2])}, got {tuple(mask.shape)}")
    return S * (alpha * mask.to(S.dtype, copy=False))[..., None]


# ---------------------------------------------------------------------------------------------- bank
@dataclass
class ShiftBank:
    languages: list          # K names, row order of bank
    pivot: str               # a language of `languages` or "mean"
    bank: torch.Tensor       # (K,L,H,D) float32, already masked to the selected heads
    heads: torch.Tensor      # (K,L,H) bool selected heads
    scores: torch.Tensor     # (K,L,H) selection scores (probe accuracy or importance)

    def index(self, langs) -> torch.Tensor:
        """Row ids (B,) long of language names."""
        bad = [x for x in langs if x not in self.languages]
        if bad:
            raise ValueError(f"languages {bad} are not in the bank {self.languages}")
        return torch.as_tensor([self.languages.index(x) for x in langs], dtype=torch.long)

    def apply(self, steerer, langs, alpha: float = 1.0):
        """Install the bank and select one language row per sample: shift[b] = alpha*bank[langs[b]]."""
        steerer.set_shift_bank(self.bank, alpha=alpha)
        steerer.select_languages(self.index(langs))


def shift_bank(outputs: dict, *, pivot: str = "mean", k=None, select: str = "probe", importance=None,
               probe: str = "logistic", train_frac: float = 0.75, seed: int = 0) -> ShiftBank:
    """Shift bank from per-language aligned outputs {lang: (N,L,H,D)}.

    select: "probe" (held-out accuracy of lang vs pivot, or vs all other languages when pivot="mean"),
    "importance" (importance[lang] (L,H), e.g. LAHIS scores) or "all" (every head). k: heads per language
    (default 5% of L*H, at least 1). The pivot's own row is zero."""
    langs = list(outputs)
    if len(langs) < 2:
        raise ValueError("outputs must hold at least 2 languages")
    if pivot != "mean" and pivot not in outputs:
        raise ValueError(f"pivot must be 'mean' or one of {langs}, got {pivot!r}")
    if select not in ("probe", "importance", "all"):
        raise ValueError(f"select must be 'probe', 'importance' or 'all', got {select!r}")
    shapes = {tuple(v.shape) for v in outputs.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"outputs must be aligned (N,L,H,D) tensors of one shape, got {sorted(shapes)}")
    _, L, H, D = next(iter(shapes))
    k = default_k(L, H) if k is None else int(k)
    means = {x: v.double().mean(0) for x, v in outputs.items()}
    ref = torch.stack(list(means.values())).mean(0) if pivot == "mean" else means[pivot]
    rows, masks, scores = [], [], []
    for lang in langs:
        if select == "all":
            sc = torch.ones(L, H)
        elif select == "importance":
            if importance is None or lang not in importance:
                raise ValueError(f"select='importance' needs importance[{lang!r}] of shape ({L}, {H})")
            sc = importance[lang].detach().float().cpu()
            if tuple(sc.shape) != (L, H):
                raise ValueError(f"importance[{lang!r}] must have shape ({L}, {H}), got {tuple(sc.shape)}")
        elif lang == pivot:
            sc = torch.zeros(L, H)
        elif pivot == "mean":
            sc = _one_vs_rest(outputs, lang, probe, train_frac, seed)
        else:
            sc = pair_probe(outputs[pivot], outputs[lang], method=probe, train_frac=train_frac, seed=seed)
        m = torch.ones(L, H, dtype=torch.bool) if select == "all" else head_mask(sc, k)
        if lang == pivot:
            m = torch.zeros(L, H, dtype=torch.bool)
        rows.append(masked_shift((means[lang] - ref).float(), m))
        masks.append(m)
        scores.append(sc)
    return ShiftBank(langs, pivot, torch.stack(rows), torch.stack(masks), torch.stack(scores))


def _one_vs_rest(outputs, lang, method, train_frac, seed):
    n = outputs[lang].shape[0]
    tr, te = split_indices(n, train_frac, seed)
    xs, ys, trs, tes = [], [], [], []
    for j, (name, v) in enumerate(outputs.items()):
        xs.append(v)
        ys.append(torch.full((n,), name == lang, dtype=torch.bool))
        trs.append(tr + j * n)
        tes.append(te + j * n)
    return probe_accuracy(torch.cat(xs), torch.cat(ys), torch.cat(trs), torch.cat(tes), method=method)
