"""Forced-choice translation retrieval rows: CLAIM (head shift lang -> en) and its divergence curve, INCLINE
(ridge map lang -> en), MEXA against retrieval accuracy, ANC against shuffled pairs."""
from __future__ import annotations

import contextlib

import torch

from . import claims, tasks
from .controls import random_like
from .intervals import bootstrap


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


def claim_rows(steerer, tok, fit, dev, test, cfg, lang="de"):
    from ..steering import shift as sh
    outs = {x: sh.head_outputs(steerer, tok, t, position="last", batch_size=16, max_length=cfg["max_length"])
            for x, t in fit.items()}
    curve, peaks = divergence(outs)
    rows = [claims.middle_peak("CLAIM: language divergence of head outputs peaks in the middle layers",
                               "multilingual attention divergence is largest in intermediate layers (Ye, Li et al. "
                               "2025)", curve, peaks, departures="text-only LLM: last-token head outputs, no image "
                               "tokens; 1 - cosine of mean outputs vs English, mean over heads and languages")]
    L, H = steerer.num_layers, steerer.num_heads
    k = max(1, int(L * H * 0.05))
    mask, acc = claim_heads(outs[lang], outs["en"], k)
    S = sh.masked_shift(claim_direction(outs[lang], outs["en"]), mask)
    seeds = cfg["seeds"]

    def run(split, bank):
        C = bank.shape[0]
        items = _items(split, lang)
        n = len(items[0])
        steerer.reset()
        steerer.set_shift_bank(bank, alpha=1.0)

        @contextlib.contextmanager
        def before(rows, batch):
            steerer.select_languages(torch.tensor([r // n for r in rows], dtype=torch.long,
                                                  device=steerer.gate.device))
            yield
        try:
            ok = tasks.choice_correct(steerer.model, tok, *_replicate(items, C), before=before)
        finally:
            steerer.reset()
        return ok.view(C, n)
    zero = torch.zeros_like(S)[None]
    grid = cfg["claim_alpha"]
    dev_ok = run(dev, torch.cat([zero] + [(a * S)[None] for a in grid]))
    gains = {a: float(dev_ok[i + 1].float().mean() - dev_ok[0].float().mean()) for i, a in enumerate(grid)}
    a = max(grid, key=lambda x: (gains[x], -x))
    bank = torch.cat([zero, (a * S)[None]] + [random_like(a * S, s)[None] for s in range(seeds)])
    ok = run(test, bank)
    heads = [f"{int(i) // H}.{int(i) % H}" for i in mask.flatten().nonzero().flatten()]
    row = claims.choice_gain(f"CLAIM: shifting {lang} heads toward English helps a {lang} -> en choice task",
                             "shifting non-English heads toward English reduces hallucination (POPE/MME; Ye, Li et "
                             "al. 2025)", ok[0], ok[1], ok[2:], setting=f"alpha {a:g} on heads {' '.join(heads)}",
                             departures="text analog: forced choice between the true English translation and "
                             "another item's, by likelihood; heads by probe accuracy (ties by shift size); alpha "
                             "chosen on dev")
    row["details"].update(dev_gain={str(x): v for x, v in gains.items()}, probe_saturated=int((acc >= 0.999).sum()))
    return rows + [row]


# ---------------------------------------------------------------------------------------------- INCLINE
def ridge(X, Y, lam: float):
    """Per-layer ridge W (L, D, D) minimising |X W - Y|^2 + lam |W|^2; X, Y (L, N, D)."""
    X, Y = X.double(), Y.double()
    D = X.shape[-1]
    A = X.transpose(1, 2) @ X + lam * torch.eye(D, dtype=torch.float64)
    return torch.linalg.solve(A, X.transpose(1, 2) @ Y).float()


def incline_row(steerer, tok, fit, dev, test, cfg, lang="de"):
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
    W = fits[lam][1]
    seeds = cfg["seeds"]

    def run(split, conds):
        """conds: list of (sigma, seed or None); -> (C, n) bool."""
        items = _items(split, lang)
        n = len(items[0])

        def before(rows, batch, last):
            outs, _ = latent.capture(model, batch)
            ar = torch.arange(len(rows), device=last.device)
            vals = {}
            for l, o in outs.items():
                h = o[ar, last].float()
                d = torch.zeros_like(h)
                for r, pid in enumerate(rows):
                    sig, seed = conds[pid // n]
                    if sig:
                        v = sig * (h[r] @ W[l].to(h.device))
                        d[r] = v if seed is None else random_like(v, seed * 1000 + l)
                vals[l] = (h + d).to(o.dtype)
            return latent.inject(model, set_last=vals, positions=last)
        steerer.reset()
        ok = tasks.choice_correct(model, tok, *_replicate(items, len(conds)), before=before, positions=True)
        return ok.view(len(conds), n)
    grid = cfg["incline_sigma"]
    dev_ok = run(dev, [(0.0, None)] + [(s, None) for s in grid])
    gains = {s: float(dev_ok[i + 1].float().mean() - dev_ok[0].float().mean()) for i, s in enumerate(grid)}
    sig = max(grid, key=lambda x: (gains[x], -abs(x)))
    ok = run(test, [(0.0, None), (sig, None)] + [(sig, s) for s in range(seeds)])
    row = claims.choice_gain(f"INCLINE: mapping {lang} representations toward English helps {lang} -> en retrieval",
                             "aligning a language's representations to English at inference improves task accuracy "
                             "(Wang et al. 2025)", ok[0], ok[1], ok[2:], setting=f"sigma {sig:g}, ridge {lam:g}",
                             departures=f"block outputs (the paper's hidden-state variant); ridge chosen on dev "
                             f"({len(src)} fit pairs); {lang} is not low-resource for this model; task: forced-choice "
                             "translation retrieval by likelihood")
    row["details"].update(dev_gain={str(x): v for x, v in gains.items()},
                          ridge_dev_error={str(f): v[0] for f, v in fits.items()})
    return row


# ---------------------------------------------------------------------------------------------- MEXA, ANC
def alignment_rows(steerer, tok, test, cfg, downstream: dict):
    from ..align import anc_score, embed_many, mexa_score
    model = steerer.model
    steerer.reset()
    emb = {x: embed_many(model, tok, t, ("weighted", "mean"), 16, cfg["max_length"]) for x, t in test.items()}
    langs = [x for x in test if x != "en"]
    curves = {x: mexa_score(emb["en"]["weighted"], emb[x]["weighted"]) for x in langs}
    mean = {x: float(c.mean()) for x, c in curves.items()}
    rows = [claims.correlation("MEXA: alignment with English predicts the per-language task score",
                               "MEXA (mean over layers) correlates with downstream performance across languages "
                               "(Kargaran et al. 2025)", mean, downstream,
                               departures="downstream = forced-choice translation retrieval accuracy (lang -> en) "
                               "on the same test paragraphs; weighted pooling, mean over layers",
                               what=f"; MEXA per layer peaks at {int(torch.stack(list(curves.values())).mean(0).argmax())}")]
    rows[0]["details"]["curves"] = {x: c.tolist() for x, c in curves.items()}
    n = len(test["en"])
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(cfg["seeds"])]
    X = emb["en"]["mean"]

    def stat(i):
        v, r = [], []
        for x in langs:
            Y = emb[x]["mean"]
            v.append(anc_score(X[:, i], Y[:, i]).mean())
            r.append(torch.stack([anc_score(X[:, i], Y[:, p[i]]).mean() for p in perms]).mean())
        return float(torch.stack(v).mean() - torch.stack(r).mean())
    est, lo, hi = bootstrap(stat, n, n_boot=200)
    holds, note = claims._decide(est, lo, hi, 0.0, n, len(perms))
    per = {x: anc_score(X, emb[x]["mean"]).tolist() for x in langs}
    m = torch.tensor(list(per.values())).mean(0)
    rows.append(claims.make_row("ANC: neurons correlate across parallel sentences beyond chance",
                                "average neuron-wise correlation of parallel sentences is high and rises in the early "
                                "layers (Del & Fishel 2022)",
                                f"ANC mean over layers {est:+.3f} [{lo:+.3f}, {hi:+.3f}] above shuffled pairs; peaks "
                                f"at layer {int(m.argmax())} ({float(m.max()):.2f})", holds, note,
                                departures="GNOME Help test paragraphs; mean pooling",
                                control=f"shuffled pairs, {len(perms)} permutations",
                                interval=f"bootstrap over {n} texts (200 resamples)",
                                details={"curves": per, "diff": [est, lo, hi]}))
    return rows, {x: c.tolist() for x, c in curves.items()}
