"""Each paper's claim as a test on measured numbers (no model): one row per claim.

A row is {claim, paper, departures, measured, holds, note, control, interval, details}. `holds` is True only
when the 95% interval (intervals.py) of the row's statistic clears its criterion, the statistic compares the
method with a matched random control of >= controls.SEEDS seeds, and (for steering) the fluency cost is
bounded; False when the interval lies on the wrong side of the criterion; None (undecided) otherwise, with
`note` saying what would decide it. Thresholds are ours: the papers give no numeric criterion.
"""
from __future__ import annotations

import math

import torch

from .controls import SEEDS
from .intervals import bootstrap, fisher_ci, pearson, verdict, wilson

STEER_RATE = 0.5      # a steering method switches the language when most outputs are in the target
MAX_COST = 1.0        # ... at a fluency cost of at most 1 nat per token (upper bound of its interval)


def make_row(claim, paper, measured, holds=None, note="", *, departures="", control="", interval="",
             details=None) -> dict:
    return {"claim": claim, "paper": paper, "departures": departures, "measured": measured,
            "holds": None if holds is None else bool(holds), "note": note, "control": control,
            "interval": interval, "details": details or {}}


def _seeds_note(s):
    return "" if s >= SEEDS else f"the control has {s} seeds (needs >= {SEEDS})"


def _decide(est, lo, hi, crit, n, seeds):
    holds, note = verdict(est, lo, hi, crit, n)
    if holds and seeds < SEEDS:
        return None, _seeds_note(seeds)
    return holds, note


def _rr(ctrl, seeds):
    return " (item i under seed i mod S)" if ctrl.shape[0] == 1 and seeds > 1 else ""


def _t(x):
    return torch.as_tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- ablations
def ablation(claim, paper, base, off, rnd, langs, departures="", what="neurons") -> dict:
    """Switching language X's units off hurts X more than the other languages and more than matched random
    units. base (K, n): per-text NLL of the plain model on each language's test texts (text i parallel across
    languages); off (K, K, n): with row language's units off, on column language's texts; rnd (K, S, n): own
    texts with S random draws. NaN marks a cell not scored (round robin); every mean skips them. Statistic:
    mean over X of own - max(others, random) increase; holds when its lower bound > 0. Texts are resampled
    jointly (they are parallel)."""
    base, off, rnd = _t(base), _t(off), _t(rnd)
    K, n = base.shape
    if off.shape != (K, K, n) or rnd.dim() != 3 or rnd.shape[0] != K or rnd.shape[2] != n:
        raise ValueError(f"shapes: base (K, n), off (K, K, n), rnd (K, S, n); got {tuple(base.shape)}, "
                         f"{tuple(off.shape)}, {tuple(rnd.shape)}")
    S = rnd.shape[1]
    eye = torch.eye(K, dtype=torch.bool)

    def parts(i):
        d = off[:, :, i] - base[None, :, i]                    # (K, K, m)
        own = d.diagonal().T.nanmean(-1)
        others = d.masked_fill(eye[..., None], float("nan")).flatten(1).nanmean(-1)
        r = (rnd[:, :, i] - base[:, None, i]).flatten(1).nanmean(-1)
        return own, others, r

    def stat(i):
        own, others, r = parts(i)
        return float((own - torch.maximum(others, r)).mean())
    est, lo, hi = bootstrap(stat, n)
    own, others, r = parts(torch.arange(n))
    holds, note = _decide(est, lo, hi, 0.0, n, S)
    per = {x: {"own": float(a), "others": float(b), "random": float(c)} for x, a, b, c in zip(langs, own, others, r)}
    measured = (f"own {float(own.mean()):+.3f} vs others {float(others.mean()):+.3f} vs random "
                f"{float(r.mean()):+.3f} nats/token; own - max(others, random) {est:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return make_row(claim, paper, measured, holds, note, departures=departures,
                    control=f"random {what} matched per layer, {S} seeds", interval=f"bootstrap over {n} texts",
                    details={"stat": est, "lo": lo, "hi": hi, "per_language": per, "langs": list(langs),
                             "delta": (off - base[None]).nanmean(-1).tolist(), "seeds": S, "n": n})


# ---------------------------------------------------------------------------------------------- steering
def steering(claim, paper, ok, ctrl, base_ok, flu, flu_base, *, min_rate=STEER_RATE, max_cost=MAX_COST,
             setting="", departures="", what="output in the target language", extra=None, seeds=None,
             clusters=None) -> dict:
    """A steering method on test prompts. ok (n,) bool: success per prompt at the strength chosen on dev;
    ctrl (S, n) bool: the matched random control at the same strength; base_ok (n,) bool: unsteered;
    flu, flu_base (n,): per-output mean NLL under the target-language prompt (NaN: empty). Holds when the
    rate's Wilson lower bound >= min_rate (None: not required), the paired bootstrap lower bounds of
    rate - control and rate - unsteered are > 0, and the fluency cost's upper bound is <= max_cost (None: not
    required). seeds: the draws behind ctrl when it is one round-robin row (controls.round_robin).
    clusters: (n,) paragraph ids when prompts from one paragraph in several languages are pooled."""
    ok, base_ok = _t(ok), _t(base_ok)
    ctrl = _t(ctrl).reshape(-1, ok.numel())
    n, S = ok.numel(), seeds or ctrl.shape[0]
    k = int(ok.sum())
    rlo, rhi = wilson(k, n)
    cm = ctrl.mean(0)
    gain = bootstrap(lambda i: float(torch.minimum((ok[i] - cm[i]).mean(), (ok[i] - base_ok[i]).mean())), n,
                     clusters=clusters)
    flu, flu_base = _t(flu), _t(flu_base)
    both = ~(flu.isnan() | flu_base.isnan())
    d = (flu - flu_base)[both]
    cost = bootstrap(lambda i: float(d[i].mean()), len(d), clusters=None if clusters is None else
                     torch.as_tensor(clusters)[both]) if len(d) else (math.nan, -math.inf, math.inf)
    checks = [verdict(*gain, 0.0, n)]
    if min_rate is not None:
        checks.append(verdict(k / n, rlo, rhi, min_rate, n))
    if max_cost is None:        # a row whose claim says nothing about fluency
        c_ok, c_bad = True, False
    else:
        c_ok = cost[2] <= max_cost if len(d) else None
        c_bad = cost[1] > max_cost if len(d) else False
    if any(h is False for h, _ in checks) or c_bad:
        holds, note = False, ""
    elif all(h for h, _ in checks) and c_ok:
        holds, note = _decide(1, 1, 1, 0, n, S)
    else:
        holds = None
        note = "; ".join(x for h, x in checks if h is None and x) or (
            f"fluency cost interval reaches {cost[2]:+.2f} > {max_cost:g} nats" if len(d) else "no output to score")
    ctl = bootstrap(lambda i: float(cm[i].mean()), n, clusters=clusters)   # per-prompt control rate
    kb = int(base_ok.sum())
    blo, bhi = wilson(kb, n)
    measured = (f"{k}/{n} = {k / n:.0%} [{rlo:.0%}, {rhi:.0%}] {what} at {setting} (random control "
                f"{ctl[0]:.0%} [{ctl[1]:.0%}, {ctl[2]:.0%}], unsteered {kb / n:.0%} [{blo:.0%}, {bhi:.0%}]); gain "
                f"over both {gain[0]:+.2f} [{gain[1]:+.2f}, {gain[2]:+.2f}]")
    if max_cost is not None:
        measured += f"; fluency cost {cost[0]:+.2f} [{cost[1]:+.2f}, {cost[2]:+.2f}] nats"
    details = {"n": n, "k": k, "rate": k / n, "wilson": [rlo, rhi], "control_rate": float(cm.mean()),
               "control_ci": list(ctl), "unsteered_rate": kb / n, "unsteered_wilson": [blo, bhi], "gain": list(gain),
               "fluency_cost": list(cost),
               "setting": setting, "seeds": S, "min_rate": min_rate, "max_cost": max_cost, **(extra or {})}
    return make_row(claim, paper, measured, holds, note, departures=departures,
                    control=f"matched random units/direction, {S} seeds" + _rr(ctrl, S),
                    interval=f"Wilson (rate), paired bootstrap over {n} prompts (gain, fluency)" + _cl(clusters),
                    details=details)


def _cl(clusters) -> str:
    return "" if clusters is None else f", resampling {len(torch.as_tensor(clusters).unique())} paragraphs whole"


def choose_strength(points: dict, max_cost: float = MAX_COST):
    """The strength picked on the dev split: {strength: (success rate, fluency cost)} -> the highest rate among
    strengths with cost <= max_cost (ties: the smaller strength); None when no strength qualifies."""
    ok = [(r, -abs(s), s) for s, (r, c) in points.items() if c <= max_cost]    # a NaN cost never qualifies
    return max(ok)[2] if ok else None


# ---------------------------------------------------------------------------------------------- choices
def choice_gain(claim, paper, base, steered, ctrl, *, setting="", departures="", task="", seeds=None,
                clusters=None) -> dict:
    """A forced-choice task (one right, one wrong answer per item) with and without the intervention.
    base, steered (n,) bool correct (or a per-item score); ctrl (S, n) with the matched random intervention
    (one round-robin row when `seeds` is given). Statistic: min(steered - unsteered, steered - control),
    paired bootstrap over items; holds when lo > 0."""
    base, steered = _t(base), _t(steered)
    ctrl = _t(ctrl).reshape(-1, base.numel())
    n, S = base.numel(), seeds or ctrl.shape[0]
    cm = ctrl.mean(0)
    est, lo, hi = bootstrap(lambda i: float(torch.minimum((steered[i] - base[i]).mean(),
                                                          (steered[i] - cm[i]).mean())), n, clusters=clusters)
    holds, note = _decide(est, lo, hi, 0.0, n, S)
    measured = (f"accuracy {float(base.mean()):.0%} -> {float(steered.mean()):.0%} at {setting} (random "
                f"{float(cm.mean()):.0%}); gain over both {est:+.3f} [{lo:+.3f}, {hi:+.3f}] on {n} items{task}")
    return make_row(claim, paper, measured, holds, note, departures=departures,
                    control=f"random direction of the same norm at the same place, {S} seeds" + _rr(ctrl, S),
                    interval=f"paired bootstrap over {n} items" + _cl(clusters),
                    details={"base": float(base.mean()), "steered": float(steered.mean()),
                             "control": float(cm.mean()), "gain": [est, lo, hi], "n": n, "seeds": S,
                             "setting": setting})


def loss_drop(claim, paper, base, after, ctrl, *, setting="", departures="", seeds=None) -> dict:
    """A per-item loss (lower is better) without the intervention (base (n,)), with it (after (n,)) and with
    the matched random intervention (ctrl (S, n)). Statistic: min(base - after, control - after), paired
    bootstrap over items; holds when lo > 0."""
    base, after = _t(base), _t(after)
    ctrl = _t(ctrl).reshape(-1, base.numel())
    n, S = base.numel(), seeds or ctrl.shape[0]
    cm = ctrl.mean(0)
    est, lo, hi = bootstrap(lambda i: float(torch.minimum((base[i] - after[i]).mean(), (cm[i] - after[i]).mean())), n)
    holds, note = _decide(est, lo, hi, 0.0, n, S)
    measured = (f"held-out loss {float(base.mean()):.4f} -> {float(after.mean()):.4f} at {setting} (random "
                f"{float(cm.mean()):.4f}); drop below both {est:+.4f} [{lo:+.4f}, {hi:+.4f}] nats on {n} items")
    return make_row(claim, paper, measured, holds, note, departures=departures,
                    control=f"the same intervention on random units, {S} seeds",
                    interval=f"paired bootstrap over {n} items",
                    details={"base": float(base.mean()), "after": float(after.mean()), "control": float(cm.mean()),
                             "drop": [est, lo, hi], "n": n, "seeds": S, "setting": setting})


# ---------------------------------------------------------------------------------------------- curves
def layer_bands(L: int):
    """(bottom, middle, top) layer lists: the first and last max(1, L // 4) layers and the rest."""
    if L < 1:
        raise ValueError(f"need at least one layer, got {L}")
    q = max(1, L // 4)
    bottom = list(range(min(q, L)))
    top = [l for l in range(max(L - q, 0), L) if l not in bottom]
    return bottom, [l for l in range(L) if l not in bottom and l not in top], top


def middle_peak(claim, paper, curve, boot_peaks, *, departures="", what="") -> dict:
    """A per-layer curve peaks in the middle layers. curve (L,): the estimate; boot_peaks: the peak layer of
    the curve recomputed on bootstrap resamples of the texts. Holds when >= 95% of the resamples peak in the
    middle band, does not hold when <= 5% do."""
    c = _t(curve)
    L = c.numel()
    _, mid, _ = layer_bands(L)
    peaks = [int(p) for p in boot_peaks]
    share = sum(p in mid for p in peaks) / max(1, len(peaks))
    if not mid or not peaks:
        holds, note = None, "fewer than 3 layers" if not mid else "no bootstrap resample"
    else:
        holds = True if share >= 0.95 else False if share <= 0.05 else None
        note = "" if holds is not None else f"the peak is in the middle in {share:.0%} of resamples; more texts"
    peak = int(c.argmax())
    measured = (f"peaks at layer {peak} of 0-{L - 1} (middle band {mid[0] if mid else '-'}-{mid[-1] if mid else '-'}) "
                f"in {share:.0%} of {len(peaks)} bootstrap resamples{what}")
    return make_row(claim, paper, measured, holds, note, departures=departures,
                    control="position of the peak against the middle band", interval="bootstrap over texts",
                    details={"curve": c.tolist(), "peak": peak, "middle": mid, "share_middle": share})


def correlation(claim, paper, x: dict, y: dict, *, departures="", what="") -> dict:
    """Pearson r across languages of a per-language score x and a downstream score y; holds when the Fisher
    95% interval's lower bound > 0; undecided with < 4 languages."""
    langs = [k for k in x if k in y]
    r = pearson([x[k] for k in langs], [y[k] for k in langs]) if len(langs) >= 2 else 0.0
    lo, hi = fisher_ci(r, len(langs))
    holds, note = verdict(r, lo, hi, 0.0, len(langs))
    if holds is None:
        note = note.replace("items", "languages")
    measured = f"r = {r:+.2f} [{lo:+.2f}, {hi:+.2f}] over {len(langs)} languages{what}"
    return make_row(claim, paper, measured, holds, note, departures=departures,
                    control="r = 0 (no relation)", interval=f"Fisher z over {len(langs)} languages",
                    details={"r": r, "ci": [lo, hi], "x": {k: x[k] for k in langs}, "y": {k: y[k] for k in langs}})


def above_shuffled(claim, paper, per_item, per_item_shuffled, *, departures="", what="") -> dict:
    """A pairing-dependent score (per item, averaged over layers) against the same score on shuffled pairs.
    per_item (n,), per_item_shuffled (S, n). Holds when the paired bootstrap lower bound of the mean
    difference is > 0."""
    a = _t(per_item)
    b = _t(per_item_shuffled).reshape(-1, a.numel())
    n, S = a.numel(), b.shape[0]
    bm = b.mean(0)
    est, lo, hi = bootstrap(lambda i: float((a[i] - bm[i]).mean()), n)
    holds, note = _decide(est, lo, hi, 0.0, n, S)
    measured = (f"{float(a.mean()):.3f} vs shuffled pairs {float(bm.mean()):.3f}; difference {est:+.3f} "
                f"[{lo:+.3f}, {hi:+.3f}]{what}")
    return make_row(claim, paper, measured, holds, note, departures=departures,
                    control=f"shuffled pairs, {S} permutations", interval=f"paired bootstrap over {n} items",
                    details={"score": float(a.mean()), "shuffled": float(bm.mean()), "diff": [est, lo, hi],
                             "n": n, "seeds": S})


# ---------------------------------------------------------------------------------------------- neurons
def classes(claim, paper, per_layer: dict, half_a: dict, half_b: dict, total: int, *, departures="") -> dict:
    """Zhang et al.'s neuron classes: their per-layer distribution, and whether each class is a stable
    finding. per_layer {class: (L,) counts}; half_a / half_b {class: set of (layer, neuron)} selected on two
    disjoint halves of the fit texts; total = number of neurons. For each class the share of half A's neurons
    also in half B gets a Wilson interval; chance is |B| / total. Holds when every class's lower bound clears
    chance; does not hold when a class's upper bound is below chance; a class absent from half A (found in
    all the fit texts or not) is undecided: more text would decide it."""
    rows, holds, notes = {}, True, []
    for c, a in half_a.items():
        b = half_b.get(c, set())
        k, n = len(a & b), len(a)
        lo, hi = wilson(k, n)
        chance = len(b) / total if total else 0.0
        rows[c] = {"overlap": k / n if n else 0.0, "wilson": [lo, hi], "chance": chance, "n": n,
                   "jaccard": k / len(a | b) if a | b else 0.0}
        h, note = verdict(k / n if n else 0.0, lo, hi, chance, n)
        found = float(_t(per_layer.get(c, [0])).sum())
        if n == 0 and found > 0:
            h, note = None, f"none in half A of the fit texts ({int(found)} in all of them): needs more fit text"
        elif n == 0:    # absent everywhere: more fit text (or another threshold) could still find some
            h, note = None, "none in the fit texts: needs more fit text to decide"
        if h is False:
            holds = False
        elif h is None and holds is not False:
            holds = None
            notes.append(f"{c}: {note}")
    dist = {c: _t(v).tolist() for c, v in per_layer.items()}
    peak = {c: int(_t(v).argmax()) if float(_t(v).sum()) else None for c, v in per_layer.items()}
    measured = "; ".join(f"{c} {int(sum(dist.get(c, [])))} (peak layer {peak.get(c)}; split-half overlap "
                         f"{r['overlap']:.0%} [{r['wilson'][0]:.0%}, {r['wilson'][1]:.0%}] vs chance {r['chance']:.1%})"
                         for c, r in rows.items())
    return make_row(claim, paper, measured, holds, "; ".join(notes), departures=departures,
                    control="chance overlap of random neuron sets of the same sizes",
                    interval="Wilson over half A's neurons",
                    details={"per_layer": dist, "split_half": rows, "total": total})


def not_measured(claim, paper, why, departures="") -> dict:
    return make_row(claim, paper, f"not measured: {why}", None, why, departures=departures)
