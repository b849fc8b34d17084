"""Forced-choice translation retrieval rows: CLAIM (head shift lang -> en) and its divergence curve, INCLINE
(ridge map lang -> en), MEXA against retrieval accuracy, ANC against shuffled pairs."""
from __future__ import annotations

import contextlib

import torch

from . import claims, tasks
from .controls import random_like
from .intervals import bootstrap, parallel_clusters


def _items(split, lang, seed=0):
    return tasks.retrieval_items(split[lang], split["en"], lang, seed)


def _replicate(items, C):
    p, t, w = items
    return p * C, t * C, w * C


def accuracy(steerer, tok, split, lang):
    """(n,) bool: unsteered forced-choice accuracy, lang -> en."""
    steerer.reset()
    return tasks.choice_correct(steerer.model, tok, *_items(split, lang))


# ---------------------------------------------------------------------------------------------- CLAIM
def claim_direction(src_out: torch.Tensor, en_out: torch.Tensor) -> torch.Tensor:
    """CLAIM's shift for lang inputs: mean_en - mean_lang per head (L, H, D): adding it moves lang toward en."""
    return en_out.double().mean(0).float() - src_out.double().mean(0).float()


def claim_heads(src_out, en_out, k: int):
    """(L, H) bool: the k heads whose held-out probe separates lang from en best; ties (the probe saturates)
    go to the larger shift relative to the head's output norm."""
    from ..steering import shift as sh
    acc = sh.pair_probe(src_out, en_out)
    S = claim_direction(src_out, en_out)
    rel = S.norm(dim=-1) / en_out.float().norm(dim=-1).mean(0).clamp_min(1e-6)
    score = acc.double() + 1e-3 * (rel / rel.max().clamp_min(1e-12)).double()
    from ..steering.shift import head_mask
    return head_mask(score, k), acc


def divergence(outs: dict):
    """Per-layer divergence of each language's mean head output from English (1 - cos, mean over heads and
    languages) and its bootstrap peaks over texts. outs {lang: (N, L, H, D)} aligned."""
    en = outs["en"].double()
    others = [v.double() for k, v in outs.items() if k != "en"]

    def curve(i):
        e = en[i].mean(0)
        c = [1 - torch.nn.functional.cosine_similarity(e, o[i].mean(0), dim=-1).mean(-1) for o in others]
        return torch.stack(c).mean(0)
    n = en.shape[0]
    g = torch.Generator().manual_seed(0)
    peaks = [int(curve(torch.randint(n, (n,), generator=g)).argmax()) for _ in range(500)]
    return curve(torch.arange(n)), peaks


def _items_n(split, lang, n):
    p, t, w = _items(split, lang)
    return p[:n], t[:n], w[:n]


def claim_rows(steerer, tok, fit, dev, test, cfg, langs=("de",)):
    """CLAIM's divergence curve, and its shift (lang -> en on each language's 5% most separable heads) on the
    forced-choice task, items pooled over `langs`, alpha chosen on dev."""
    from ..steering import shift as sh
    outs = {x: sh.head_outputs(steerer, tok, t, position="last", batch_size=16, max_length=cfg["max_length"])
            for x, t in fit.items()}
    curve, peaks = divergence(outs)
    rows = {"claim_divergence": claims.middle_peak(
        "CLAIM: language divergence of head outputs peaks in the middle layers", "multilingual attention "
        "divergence is largest in intermediate layers (Ye, Li et al. 2025)", curve, peaks,
        departures="text-only LLM: last-token head outputs, no image tokens; 1 - cosine of mean outputs vs "
        "English, mean over heads and languages")}
    L, H = steerer.num_layers, steerer.num_heads
    k = max(1, int(L * H * 0.05))
    seeds, grid, n = cfg["seeds"], cfg["claim_alpha"], cfg["n_choice"]

    def run(split, lang, bank, rr=0):
        """(C, m) bool correct under each bank row; with rr > 0 the last rr rows are random draws and item
        i gets draw i mod rr: C = rows - rr + 1."""
        items = _items_n(split, lang, n)
        m = len(items[0])
        C = bank.shape[0] - rr + (1 if rr else 0)
        steerer.reset()
        steerer.set_shift_bank(bank, alpha=1.0)

        def row_of(r):
            c, i = divmod(r, m)
            return c if not rr or c < C - 1 else c + i % rr

        @contextlib.contextmanager
        def before(rows, batch):
            steerer.select_languages(torch.tensor([row_of(r) for r in rows], dtype=torch.long,
                                                  device=steerer.gate.device))
            yield
        try:
            ok = tasks.choice_correct(steerer.model, tok, *_replicate(items, C), before=before)
        finally:
            steerer.reset()
        return ok.view(C, m)
    shifts, heads, sat, dev_ok = {}, {}, {}, {}
    for x in langs:
        mask, acc = claim_heads(outs[x], outs["en"], k)
        shifts[x] = sh.masked_shift(claim_direction(outs[x], outs["en"]), mask)
        heads[x] = [f"{int(i) // H}.{int(i) % H}" for i in mask.flatten().nonzero().flatten()]
        sat[x] = int((acc >= 0.999).sum())
        S = shifts[x]
        dev_ok[x] = run(dev, x, torch.cat([torch.zeros_like(S)[None]] + [(a * S)[None] for a in grid]))
    dv = torch.cat(list(dev_ok.values()), dim=1)
    gains = {a: float(dv[i + 1].float().mean() - dv[0].float().mean()) for i, a in enumerate(grid)}
    a = max(grid, key=lambda v: (gains[v], -v))
    ok = torch.cat([run(test, x, torch.cat([torch.zeros_like(shifts[x])[None], (a * shifts[x])[None]] +
                                           [random_like(a * shifts[x], s)[None] for s in range(seeds)]), rr=seeds)
                    for x in langs], dim=1)
    row = claims.choice_gain("CLAIM: shifting heads toward English helps a x -> en choice task",
                             "shifting non-English heads toward English reduces hallucination (POPE/MME; Ye, Li et "
                             "al. 2025)", ok[0], ok[1], ok[2:], setting=f"alpha {a:g}", seeds=seeds,
                             departures="text analog: forced choice between the true English translation and "
                             "another item's, by likelihood; heads by probe accuracy (ties by shift size), 5% per "
                             f"language; alpha chosen on dev; items pooled over {', '.join(langs)}",
                             task=f" ({', '.join(langs)})",
                             clusters=parallel_clusters(len(langs), ok.shape[1] // len(langs)))
    row["details"].update(dev_gain={str(v): g for v, g in gains.items()}, probe_saturated=sat, heads=heads)
    rows["claim_shift"] = row
    return rows


# ---------------------------------------------------------------------------------------------- INCLINE
def ridge(X, Y, lam: float):
    """Per-layer ridge W (L, D, D) minimising |X W - Y|^2 + lam |W|^2; X, Y (L, N, D)."""
    X, Y = X.double(), Y.double()
    D = X.shape[-1]
    A = X.transpose(1, 2) @ X + lam * torch.eye(D, dtype=torch.float64)
    return torch.linalg.solve(A, X.transpose(1, 2) @ Y).float()


def incline_fit(steerer, tok, fit, dev, cfg, lang):
    """INCLINE's per-layer ridge map lang -> en on the fit pairs (the released augmentation), the ridge
    strength chosen by the relative error on dev: (W (L, D, D), lambda factor, {factor: dev error})."""
    from ..steering import latent
    model = steerer.model
    src, en = list(fit[lang]), list(fit["en"])
    src = [s + " " + e if i % 2 else s for i, (s, e) in enumerate(zip(src, en))]   # the released augmentation
    en2 = [e + " " + e if i % 2 else e for i, e in enumerate(en)]
    Xs = latent.pooled_states(model, tok, src, batch_size=16, max_length=2 * cfg["max_length"])
    Xe = latent.pooled_states(model, tok, en2, batch_size=16, max_length=2 * cfg["max_length"])
    Ds = latent.pooled_states(model, tok, dev[lang], batch_size=16, max_length=cfg["max_length"])
    De = latent.pooled_states(model, tok, dev["en"], batch_size=16, max_length=cfg["max_length"])
    scale = float((Xs.double() ** 2).sum(-1).mean())
    fits = {}
    for f in (1e-3, 1e-2, 1e-1, 1.0):
        W = ridge(Xs, Xe, f * scale)
        err = float(((Ds @ W - De) ** 2).sum() / ((De - De.mean(1, keepdim=True)) ** 2).sum())
        fits[f] = (err, W)
    lam = min(fits, key=lambda f: fits[f][0])
    return fits[lam][1], lam, {str(f): v[0] for f, v in fits.items()}


def incline_row(steerer, tok, fit, dev, test, cfg, langs=("de",)):
    """INCLINE (ridge map lang -> en, sigma on dev) on forced-choice retrieval, items pooled over `langs`."""
    from ..steering import latent
    model = steerer.model
    seeds, n = cfg["seeds"], cfg["n_choice"]

    def run(split, lang, W, conds):
        """conds: list of (sigma, seed or None; "rr": item i gets seed i mod seeds); -> (C, m) bool."""
        items = _items_n(split, lang, n)
        m = len(items[0])

        def before(rows, batch, last):
            outs, _ = latent.capture(model, batch)
            ar = torch.arange(len(rows), device=last.device)
            vals = {}
            for l, o in outs.items():
                h = o[ar, last].float()
                d = torch.zeros_like(h)
                for r, pid in enumerate(rows):
                    sig, seed = conds[pid // m]
                    seed = pid % m % seeds if seed == "rr" else seed
                    if sig:
                        v = sig * (h[r] @ W[l].to(h.device))
                        d[r] = v if seed is None else random_like(v, seed * 1000 + l)
                vals[l] = (h + d).to(o.dtype)
            return latent.inject(model, set_last=vals, positions=last)
        steerer.reset()
        ok = tasks.choice_correct(model, tok, *_replicate(items, len(conds)), before=before, positions=True)
        return ok.view(len(conds), m)
    grid = cfg["incline_sigma"]
    maps, dev_ok = {}, []
    for x in langs:
        maps[x] = incline_fit(steerer, tok, fit, dev, cfg, x)
        dev_ok.append(run(dev, x, maps[x][0], [(0.0, None)] + [(s, None) for s in grid]))
    dv = torch.cat(dev_ok, dim=1)
    gains = {s: float(dv[i + 1].float().mean() - dv[0].float().mean()) for i, s in enumerate(grid)}
    sig = max(grid, key=lambda v: (gains[v], -abs(v)))
    ok = torch.cat([run(test, x, maps[x][0], [(0.0, None), (sig, None), (sig, "rr")]) for x in langs], dim=1)
    row = claims.choice_gain("INCLINE: mapping representations toward English helps x -> en retrieval",
                             "aligning a language's representations to English at inference improves task accuracy "
                             "(Wang et al. 2025)", ok[0], ok[1], ok[2:], setting=f"sigma {sig:g}", seeds=seeds,
                             departures=f"block outputs (the paper's hidden-state variant); ridge chosen on dev "
                             f"({len(fit['en'])} fit pairs per language); none of {', '.join(langs)} is low-resource "
                             "for this model; task: forced-choice translation retrieval by likelihood; sigma chosen "
                             "on dev", task=f" ({', '.join(langs)})",
                             clusters=parallel_clusters(len(langs), ok.shape[1] // len(langs)))
    row["details"].update(dev_gain={str(v): g for v, g in gains.items()},
                          ridge={x: {"lambda": v[1], "dev_error": v[2]} for x, v in maps.items()})
    return row


# ---------------------------------------------------------------------------------------------- MEXA, ANC
def alignment_rows(steerer, tok, test, cfg, downstream: dict):
    """MEXA against a per-language downstream score, and ANC (above shuffled pairs, rising in the early
    layers): ({"mexa", "anc"} rows, MEXA curves)."""
    from ..align import anc_score, embed_many, mexa_score
    model = steerer.model
    steerer.reset()
    emb = {x: embed_many(model, tok, t, ("weighted", "mean"), 16, cfg["max_length"]) for x, t in test.items()}
    langs = [x for x in test if x != "en"]
    curves = {x: mexa_score(emb["en"]["weighted"], emb[x]["weighted"]) for x in langs}
    mean = {x: float(c.mean()) for x, c in curves.items()}
    mexa = claims.correlation("MEXA: alignment with English predicts the per-language task score",
                              "MEXA (mean over layers) correlates with downstream performance across languages "
                              "(Kargaran et al. 2025)", mean, downstream,
                              departures="downstream = forced-choice translation retrieval accuracy (lang -> en) "
                              "on the same test paragraphs; weighted pooling, mean over layers",
                              what=f"; MEXA per layer peaks at {int(torch.stack(list(curves.values())).mean(0).argmax())}"
                              )
    mexa["details"]["curves"] = {x: c.tolist() for x, c in curves.items()}
    n = len(test["en"])
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(cfg["seeds"])]
    X = emb["en"]["mean"]
    L1 = X.shape[0]                       # layers + 1 (index 0: the embeddings)
    q = max(1, (L1 - 1) // 4)

    def curve(i, perm=None):
        """(L+1,) ANC per layer, mean over languages, on texts i (English paired with perm[i] if given)."""
        j = i if perm is None else perm[i]
        return torch.stack([anc_score(X[:, i], emb[x]["mean"][:, j]) for x in langs]).mean(0)

    def above(i):
        return float((curve(i) - torch.stack([curve(i, p) for p in perms]).mean(0)).mean())

    def rise(i):
        c = curve(i)
        return float(c[1:q + 1].mean() - c[0])
    a, r = bootstrap(above, n, n_boot=200), bootstrap(rise, n, n_boot=200)
    verdicts = [claims._decide(*a, 0.0, n, len(perms)), claims._decide(*r, 0.0, n, len(perms))]
    holds = False if any(h is False for h, _ in verdicts) else True if all(h for h, _ in verdicts) else None
    note = "; ".join(x for h, x in verdicts if h is None and x)
    m = curve(torch.arange(n))
    anc = claims.make_row("ANC: neurons correlate across parallel sentences beyond chance, rising in the early layers",
                          "average neuron-wise correlation of parallel sentences is high and rises in the early "
                          "layers (Del & Fishel 2022)",
                          f"ANC mean over layers {a[0]:+.3f} [{a[1]:+.3f}, {a[2]:+.3f}] above shuffled pairs; layers "
                          f"1-{q} minus the embeddings {r[0]:+.3f} [{r[1]:+.3f}, {r[2]:+.3f}]; peaks at layer "
                          f"{int(m.argmax())} ({float(m.max()):.2f})", holds, note,
                          departures="GNOME Help test paragraphs; mean pooling; layer 0 = the embeddings",
                          control=f"shuffled pairs, {len(perms)} permutations; the embedding layer",
                          interval=f"bootstrap over {n} texts (200 resamples)",
                          details={"curve": m.tolist(), "above_shuffled": list(a), "early_rise": list(r),
                                   "curves": {x: anc_score(X, emb[x]["mean"]).tolist() for x in langs}})
    return {"mexa": mexa, "anc": anc}, {x: c.tolist() for x, c in curves.items()}
