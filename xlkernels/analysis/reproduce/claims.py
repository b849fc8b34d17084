"""The seeds' central claims as tests on measured numbers (used by `xlkernels reproduce`).

Each function takes the measurements of one claim (matrices, counts, curves: no model) and returns one row
{claim, paper, measured, holds, details}: `holds` is True / False, or None when the claim cannot be decided
on these inputs (e.g. a model too shallow to have "middle layers"); `measured` is one line for the table;
`details` holds the numbers behind it (JSON-ready). The tests and their thresholds are ours: the papers give
no numeric criterion (docs/methods.md sections 1, 3, 4, 7).

Layer bands: with L layers and q = max(1, L // 4), the "bottom" layers are the first q, the "top" layers
the last q and the "middle" layers the rest (L = 18: 0-3 | 4-13 | 14-17).
"""
from __future__ import annotations

import math

import torch

LAPE_FACTOR = 2.0      # "far more": mean diagonal >= 2x the mean off-diagonal increase
EDGE_RATIO = 1.5       # "concentrate": bottom and top layers each hold >= 1.5x the middle's neurons per layer
STEER_RATE = 0.5       # a steering method "switches the language" when most generations are in the target


def make_row(claim: str, paper: str, measured: str, holds, details: dict) -> dict:
    return {"claim": claim, "paper": paper, "measured": measured,
            "holds": None if holds is None else bool(holds), "details": details}


def _matrix(m, name, K=None) -> torch.Tensor:
    t = torch.as_tensor(m, dtype=torch.float64)
    if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] < 2:
        raise ValueError(f"{name} must be a square (K, K) matrix with K >= 2, got shape {tuple(t.shape)}")
    if K is not None and t.shape[0] != K:
        raise ValueError(f"{name} is {t.shape[0]}x{t.shape[0]} but {K} languages were given")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite entries")
    return t


def _langs(langs, K):
    langs = [str(x) for x in (langs if langs is not None else range(K))]
    if len(langs) != K:
        raise ValueError(f"langs has {len(langs)} names for {K} rows")
    return langs


def diag_offdiag(m: torch.Tensor, rows=None):
    """(mean diagonal, mean off-diagonal, per-row diagonal, per-row mean off-diagonal) over `rows` (default
    all) of a (K, K) matrix."""
    K = m.shape[0]
    rows = list(range(K)) if rows is None else list(rows)
    off = m.masked_fill(torch.eye(K, dtype=torch.bool), 0.0).sum(1) / (K - 1)
    d = m.diagonal()
    idx = torch.as_tensor(rows, dtype=torch.long)
    return float(d[idx].mean()), float(off[idx].mean()), d, off


# ---------------------------------------------------------------------------------------------- LAPE
def lape_deactivation(delta, langs=None, factor: float = LAPE_FACTOR) -> dict:
    """LAPE's K x K deactivation matrix (rows: language whose neurons are off, columns: evaluated language;
    entries: NLL increase over the unmodified model). Holds when the mean diagonal is positive and at least
    `factor` times the mean off-diagonal increase (negative off-diagonal counts as 0)."""
    m = _matrix(delta, "delta")
    langs = _langs(langs, m.shape[0])
    dm, om, d, off = diag_offdiag(m)
    holds = dm > 0 and dm >= factor * max(om, 0.0)
    ratio = dm / om if om > 0 else math.inf
    per = {x: {"own": float(a), "others": float(b)} for x, a, b in zip(langs, d, off)}
    rows_ok = sum(float(a) > factor * max(float(b), 0.0) and float(a) > 0 for a, b in zip(d, off))
    times = f"x{ratio:.1f}" if math.isfinite(ratio) else "others not raised"
    measured = (f"own {dm:+.3f} vs others {om:+.3f} nats ({times}); own >= {factor:g}x others for "
                f"{rows_ok}/{len(langs)} languages")
    return make_row("LAPE: language neurons are language-specific",
                    "deactivating language X's neurons raises X's NLL far more than the other languages' "
                    "(Tang et al. 2024)", measured, holds,
                    {"diag_mean": dm, "offdiag_mean": om, "ratio": ratio if math.isfinite(ratio) else None,
                     "factor": factor, "languages_ok": rows_ok, "per_language": per, "langs": langs,
                     "delta": m.tolist()})


def layer_bands(L: int):
    """(bottom, middle, top) layer lists for L layers (see the module doc); middle is empty for L < 3."""
    if L < 1:
        raise ValueError(f"need at least one layer, got {L}")
    q = max(1, L // 4)
    bottom = list(range(min(q, L)))
    top = [l for l in range(max(L - q, 0), L) if l not in bottom]
    return bottom, [l for l in range(L) if l not in bottom and l not in top], top


def lape_layers(counts, min_ratio: float = EDGE_RATIO) -> dict:
    """Do LAPE's neurons concentrate in the bottom AND the top layers? counts: (L,) neurons per layer, or
    (K, L) per language (summed). Holds when the bottom quarter and the top quarter each hold >= `min_ratio`
    times as many neurons per layer as the middle half; undecided (None) with fewer than 3 layers or no
    neuron."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    if c.dim() == 2:
        c = c.sum(0)
    if c.dim() != 1 or (c < 0).any():
        raise ValueError(f"counts must be (L,) or (K, L) non-negative counts, got shape {tuple(c.shape)}")
    L = c.numel()
    bottom, mid, top = layer_bands(L)
    total = float(c.sum())
    details = {"per_layer": c.tolist(), "bottom_layers": bottom, "middle_layers": mid, "top_layers": top,
               "total": total, "min_ratio": min_ratio}
    claim = "LAPE: language neurons sit in the bottom and top layers"
    paper = "language-specific neurons concentrate in the top and bottom layers (Tang et al. 2024)"
    if not mid or total == 0:
        why = "fewer than 3 layers" if not mid else "no neuron selected"
        return make_row(claim, paper, f"undecided: {why}", None, details)
    dens = {k: float(c[v].sum()) / len(v) for k, v in (("bottom", bottom), ("middle", mid), ("top", top))}
    ratio = {k: (dens[k] / dens["middle"] if dens["middle"] > 0 else math.inf) for k in ("bottom", "top")}
    share = {k: float(c[v].sum()) / total for k, v in (("bottom", bottom), ("middle", mid), ("top", top))}
    details.update(per_layer_density=dens, share=share, uniform_share={"bottom": len(bottom) / L,
                   "middle": len(mid) / L, "top": len(top) / L},
                   ratio={k: (v if math.isfinite(v) else None) for k, v in ratio.items()}, peak_layer=int(c.argmax()))
    measured = (f"of {int(total)} neurons: layers 0-{bottom[-1]} {share['bottom']:.0%}, {mid[0]}-{mid[-1]} "
                f"{share['middle']:.0%}, {top[0]}-{top[-1]} {share['top']:.0%}; per layer bottom "
                f"{ratio['bottom']:.1f}x, top {ratio['top']:.1f}x the middle")
    return make_row(claim, paper, measured, ratio["bottom"] >= min_ratio and ratio["top"] >= min_ratio, details)


# ---------------------------------------------------------------------------------------------- LAHIS
def lahis_masking(delta, random_delta, n_heads, langs=None) -> dict:
    """LAHIS ablation. delta (K, K): loss increase on column language's texts with the row language's
    language-specific heads gated to 0; random_delta (K,) or (K, S): increase on each language's own texts
    with as many random heads gated to 0 (S seeds); n_heads (K,): heads masked per language (rows with 0
    heads are left out). Holds when the mean own-language increase beats both the mean increase on the other
    languages and the random baseline."""
    m = _matrix(delta, "delta")
    K = m.shape[0]
    langs = _langs(langs, K)
    r = torch.as_tensor(random_delta, dtype=torch.float64)
    r = r.unsqueeze(1) if r.dim() == 1 else r
    if r.dim() != 2 or r.shape[0] != K or not torch.isfinite(r).all():
        raise ValueError(f"random_delta must be finite (K,) or (K, S) with K = {K}, got {tuple(r.shape)}")
    n = [int(x) for x in n_heads]
    if len(n) != K or min(n) < 0:
        raise ValueError(f"n_heads must be {K} non-negative counts, got {n_heads}")
    rows = [i for i in range(K) if n[i] > 0]
    claim = "LAHIS: language-specific heads matter for their language"
    paper = ("masking language X's top language-specific heads raises X's loss more than the other "
             "languages' and more than masking random heads (Liu et al. 2025)")
    details = {"langs": langs, "n_heads": dict(zip(langs, n)), "delta": m.tolist(), "random": r.tolist(),
               "seeds": r.shape[1]}
    if not rows:
        return make_row(claim, paper, "undecided: no language has a language-specific head", None, details)
    dm, om, d, off = diag_offdiag(m, rows)
    rnd = r.mean(1)
    rm = float(rnd[rows].mean())
    beats_others = sum(float(d[i]) > float(off[i]) for i in rows)
    beats_random = sum(float(d[i]) > float(rnd[i]) for i in rows)
    details.update(diag_mean=dm, offdiag_mean=om, random_mean=rm, languages=len(rows),
                   beats_others=beats_others, beats_random=beats_random,
                   per_language={langs[i]: {"own": float(d[i]), "others": float(off[i]), "random": float(rnd[i])}
                                 for i in rows})
    measured = (f"own {dm:+.3f} vs others {om:+.3f} vs random {rm:+.3f} nats ({sum(n[i] for i in rows)} heads "
                f"over {len(rows)} languages; own > others {beats_others}/{len(rows)}, > random "
                f"{beats_random}/{len(rows)})")
    return make_row(claim, paper, measured, dm > om and dm > rm, details)


def soft_mask(loss_before: float, loss_after: float, k: int, n_train: int, n_heldout: int, lang: str,
              random_after: float | None = None) -> dict:
    """Soft head mask: held-out answer loss with the trained gates vs the unmodified model (and, when given,
    vs gates trained on k random heads). Holds when the trained gates lower the held-out loss."""
    for name, v in (("loss_before", loss_before), ("loss_after", loss_after)):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    gain = loss_before - loss_after
    measured = (f"held-out answer loss {loss_before:.4f} -> {loss_after:.4f} ({-gain:+.4f}) with {k} trained "
                f"gate(s), {lang}, {n_train} train / {n_heldout} held-out pairs")
    details = {"lang": lang, "k": k, "n_train": n_train, "n_heldout": n_heldout, "loss_before": loss_before,
               "loss_after": loss_after, "gain": gain}
    if random_after is not None:
        details["random_after"] = random_after
        measured += f"; random heads: {random_after:.4f}"
    return make_row("Soft head mask: a few trained head gates help",
                    "training the gates of the top 2% LAHIS heads (~20 parameters) improves held-out QA "
                    "(Liu et al. 2025)", measured, loss_after < loss_before, details)


# ---------------------------------------------------------------------------------------------- neurons
def ternary_classes(appear, specific: int, related: int, general: int, lam: float, K: int) -> dict:
    """Zhang et al.'s three neuron classes: holds when language-specific (assigned to 1 language),
    language-related (2..K-1 languages) and general (above the bar in all K languages) neurons each exist."""
    appear = [int(a) for a in appear]
    if len(appear) != K + 1:
        raise ValueError(f"appear must have K + 1 = {K + 1} entries (c = 0..K), got {len(appear)}")
    counts = {"specific": int(specific), "related": int(related), "general": int(general)}
    if min(counts.values()) < 0:
        raise ValueError(f"class counts must be >= 0, got {counts}")
    missing = [c for c, v in counts.items() if v == 0]
    measured = (f"specific {specific}, related {related}, general {general}; lambda {lam:.4f}; appear[1..{K}] = "
                f"{appear[1:]}" + (f"; missing: {', '.join(missing)}" if missing else ""))
    return make_row("Neurons: specific, related and general classes",
                    "language-specific, language-related and language-agnostic (general) neurons each exist "
                    "(Zhang et al. 2025)", measured, not missing,
                    {**counts, "lambda": lam, "appear": appear, "K": K})


# ---------------------------------------------------------------------------------------------- MEXA
def mexa_peak(curves: dict) -> dict:
    """MEXA alignment with English per hidden state (index 0 = embeddings, L = last layer), averaged over
    languages. Holds when the mean curve peaks in the middle layers (not in the first or last quarter) and
    above the embeddings."""
    if not curves:
        raise ValueError("curves must hold at least one language")
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in curves.values()])
    if t.dim() != 2 or t.shape[1] < 2:
        raise ValueError(f"curves must be per-layer lists of the same length >= 2, got shape {tuple(t.shape)}")
    mean = t.mean(0)
    L = mean.numel() - 1
    peak = int(mean.argmax())
    _, mid, _ = layer_bands(L + 1)
    per = {lang: {"peak_layer": int(row.argmax()), "peak": float(row.max())} for lang, row in zip(curves, t)}
    details = {"mean": mean.tolist(), "peak_layer": peak, "peak": float(mean[peak]),
               "embeddings": float(mean[0]), "last": float(mean[-1]), "middle_layers": mid,
               "per_language": per}
    measured = (f"mean over {len(curves)} languages peaks at layer {peak} of {L} ({float(mean[peak]):.2f}; "
                f"embeddings {float(mean[0]):.2f}, last {float(mean[-1]):.2f})")
    holds = None if not mid else (peak in mid and float(mean[peak]) > float(mean[0]))
    return make_row("MEXA: alignment with English peaks in the middle layers",
                    "per-layer alignment with English (MEXA, Kargaran et al. 2025); mid-layer peak as reported "
                    "for Llama-family models", measured, holds, details)


# ---------------------------------------------------------------------------------------------- steering
def best_setting(points: list) -> dict:
    """The point with the highest target rate; ties go to the lower fluency NLL."""
    return max(points, key=lambda p: (p["target_rate"], -p.get("nll", 0.0)))


def steering(method: str, points: list, baseline: dict, min_rate: float = STEER_RATE) -> dict:
    """One steering method at its best setting. points: [{"setting", "target_rate", "source_rate", "nll"}]
    from the eval sweep; baseline: the unsteered model's {"target_rate", "nll"}. Holds when the best
    setting puts >= min_rate of the generations in the target language (and more than unsteered)."""
    if not points:
        raise ValueError(f"no sweep points for {method!r}")
    b = best_setting(points)
    cost = b["nll"] - baseline["nll"]
    holds = b["target_rate"] >= min_rate and b["target_rate"] > baseline["target_rate"]
    measured = (f"{b['target_rate']:.0%} in the target language at {b['setting']} (unsteered "
                f"{baseline['target_rate']:.0%}); fluency NLL {b['nll']:.2f} ({cost:+.2f})")
    return make_row(f"Steering: {method}", "steering switches the output language to the target "
                    "(method's paper)", measured, holds,
                    {"method": method, "best": b, "baseline": baseline, "fluency_cost": cost, "min_rate": min_rate,
                     "points": points})
