"""`xlkernels reproduce`: each paper's claim measured on one model, one row per claim (claims.py).

`run(model, tokenizer, ...)` splits a parallel corpus (default: GNOME Help, corpus.py) into seeded,
length-matched fit / dev / test parts: statistics, scores and fits on fit, strengths on dev, every reported
number on test. With `out` it writes report.md, reproduce.json and plots (report.py).
"""
from __future__ import annotations

import random
import sys
import time
import traceback

import torch

from . import claims, tasks
from .controls import random_heads, random_neurons
from .report import environment, format_table, previous_rows, print_summary, write_report  # noqa: F401 (API)

LEVELS = {
    # demo: `make demo` step 4 on the Django corpus (no generation rows); default: the recorded run
    "demo": dict(langs=("en", "de", "fr"), seeds=10, n_nll=10, n_lahis=4, lahis_heads=2, max_length=48,
                 new_tokens=12, n_prompts=16, n_offtarget=0, n_choice=12, steps=("neurons", "heads", "alignment")),
    "quick": dict(langs=("en", "de", "fr", "es", "ru", "zh_Hans", "ja"), seeds=10, n_nll=24, n_lahis=12,
                  lahis_heads=3, max_length=64, new_tokens=12, n_prompts=24, n_offtarget=10, n_choice=24,
                  choice_langs=("de",), n_experts=24, mask_train=8, mask_seeds=3, steps=None),
    # default: the recorded run; 64 steering prompts and choice items (issue 18: >= 64), 48 NLL paragraphs
    "default": dict(langs=("en", "de", "fr", "es", "ru", "zh_Hans", "ja"), seeds=10, n_nll=48, n_lahis=16,
                    lahis_heads=3, max_length=96, new_tokens=16, n_prompts=64, n_offtarget=16, n_choice=64,
                    choice_langs=("de", "ja"), n_experts=48, mask_train=16, mask_seeds=10, steps=None),
    "full": dict(langs=("en", "de", "fr", "es", "ru", "zh_Hans", "ja"), seeds=20, n_nll=111, n_lahis=48,
                 lahis_heads=3, max_length=128, new_tokens=24, n_prompts=111, n_offtarget=32, n_choice=111,
                 choice_langs=("de", "fr", "es", "ru", "zh_Hans", "ja"), n_experts=96, mask_train=48,
                 mask_seeds=20, steps=None),
}
COMMON = dict(forcing=(0.5, 1.0, 2.0), itlc=(2.0, 8.0, 32.0), itlc_epochs=100, claim_alpha=(2.0, 8.0, 32.0),
              incline_sigma=(0.3, 1.0), fractions=(0.5, 0.15, 0.35), target="de", n_choice=64,
              choice_langs=("de",), n_offtarget=16, n_experts=48, expert_frac=0.01, mask_train=16, mask_batch=4,
              mask_epochs=2, mask_lr=0.1, mask_seeds=10,
              itlc_sample=dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.5))
STEPS = ("neurons", "heads", "soft_mask", "steering", "choice", "alignment", "experts")
# every row of the report, in order: key -> (step, claim, paper); a row that a run does not measure still
# appears, undecided, saying what it needs
ROWS = {
    "lape_ablation": ("neurons", "LAPE: a language's neurons matter for that language", "Tang et al. 2024"),
    "neuron_classes": ("neurons", "Neurons: language-specific, -related and general classes are stable, per layer",
                       "Zhang et al. 2025"),
    "lahis_ablation": ("heads", "LAHIS: a language's specific heads matter for that language", "Liu et al. 2025"),
    "lahis_offtarget": ("heads", "LAHIS: masking a language's heads sends its prompts off-target", "Liu et al. 2025"),
    "soft_mask": ("soft_mask", "Soft head mask: a few trained head gates help held-out QA", "Liu et al. 2025"),
    "lape_forcing": ("steering", "LAPE: forcing language neurons steers en -> {tgt}", "Tang et al. 2024"),
    "lape_deactivation": ("steering", "LAPE: switching English neurons off moves English prompts out of English",
                          "Tang et al. 2024"),
    "itlc": ("steering", "ITLC: a latent language vector steers en -> {tgt}, keeping the meaning", "Lopo et al. 2025"),
    "claim_divergence": ("choice", "CLAIM: language divergence of head outputs peaks in the middle layers",
                         "Ye, Li et al. 2025"),
    "claim_shift": ("choice", "CLAIM: shifting heads toward English helps a x -> en choice task", "Ye, Li et al. 2025"),
    "incline": ("choice", "INCLINE: mapping representations toward English helps x -> en retrieval",
                "Wang et al. 2025"),
    "mexa": ("alignment", "MEXA: alignment with English predicts the per-language task score", "Kargaran et al. 2025"),
    "anc": ("alignment", "ANC: neurons correlate across parallel sentences beyond chance, rising in the early layers",
            "Del & Fishel 2022"),
    "experts": ("experts", "Finding experts: forcing English expert neurons aligns other languages with English",
                "Sundar et al. 2025"),
}


def _nll(steerer, tok, test, cells):
    """(len(cells),) mean NLL per token of test[x][i] for each cell (x, i), scored after test[x][i - 1]."""
    return tasks.prefixed_nll(steerer.model, tok, [test[x][i] for x, i in cells], [test[x][i - 1] for x, i in cells])


def _ablate(steerer, tok, test, apply_own, apply_rand, seeds):
    """base (K, n), off (K, K, n), rnd (K, S, n) per-text NLL; apply_own(k) / apply_rand(k, seed) set the
    intervention for language k on the steerer. Round robin keeps it at 4 K n scored texts in K (S + 1) + 1
    passes: with language k's units off, text i of the other languages is scored in one of them (i mod K-1),
    and the random draw on text i is seed i mod S; the cells not scored are NaN."""
    langs = list(test)
    K, n = len(langs), len(test[langs[0]])
    steerer.reset()
    cells = [(x, i) for x in langs for i in range(n)]
    base = _nll(steerer, tok, test, cells).view(K, n)
    off = torch.full((K, K, n), float("nan"), dtype=torch.float64)
    rnd = torch.full((K, seeds, n), float("nan"), dtype=torch.float64)
    try:
        for k in range(K):
            others = [j for j in range(K) if j != k]
            idx = [(k, i) for i in range(n)] + [(others[i % (K - 1)], i) for i in range(n) if K > 1]
            steerer.reset()
            apply_own(k)
            vals = _nll(steerer, tok, test, [(langs[j], i) for j, i in idx])
            for (j, i), v in zip(idx, vals.tolist()):
                off[k, j, i] = v
            for s in range(seeds):
                ids = list(range(s, n, seeds))
                if ids:
                    steerer.reset()
                    apply_rand(k, s)
                    rnd[k, s, ids] = _nll(steerer, tok, test, [(langs[k], i) for i in ids])
    finally:
        steerer.reset()
    return base, off, rnd


def measure_neurons(steerer, tok, fit, dev, test, cfg, state):
    """LAPE on the fit texts (BOS not counted); specificity by deactivation vs matched random neurons; the
    classes per layer with split-half stability."""
    from .. import neurons as N
    langs = list(fit)
    h = len(fit["en"]) // 2
    halves = [{x: t[:h] for x, t in fit.items()}, {x: t[h:] for x, t in fit.items()}]
    st = [N.collect_stats(steerer, tok, c, batch_size=16, max_length=cfg["max_length"], progress=False,
                          drop_bos=True) for c in halves]
    full = st[0].clone().merge(st[1])
    p = N.activation_probs(full)
    lape = N.lape(p)
    state.update(stats=full, lape=lape)
    L, I = steerer.num_layers, steerer.num_neurons
    sets = [{l: lape.neurons[k][l].long() for l in range(L) if len(lape.neurons[k][l])} for k in range(len(langs))]
    chosen = {l: torch.cat([s[l] for s in sets if l in s]) for l in range(L) if any(l in s for s in sets)}
    test_n = {x: t[:cfg["n_nll"]] for x, t in test.items()}
    base, off, rnd = _ablate(steerer, tok, test_n, lambda k: sets[k] and steerer.deactivate_neurons(sets[k]),
                             lambda k, s: sets[k] and steerer.deactivate_neurons(
                                 random_neurons(sets[k], I, s, exclude=chosen)), cfg["seeds"])
    row = claims.ablation("LAPE: a language's neurons matter for that language",
                          "deactivating language X's neurons raises X's perplexity far more than the others' (Tang "
                          "et al. 2024)", base, off, rnd, langs,
                          departures="GNOME Help fit paragraphs (not Wikipedia), BOS not counted; each test "
                          "paragraph's NLL scored after the preceding one as context", what="neurons")
    row["details"]["n_neurons"] = {x: int(lape.counts()[k].sum()) for k, x in enumerate(langs)}
    jac = split_half_jaccard([N.lape(N.activation_probs(s)) for s in st], langs, L)
    row["details"]["split_half_jaccard"] = jac
    row["measured"] += ("; neurons selected on each half of the fit texts: Jaccard " +
                        ", ".join(f"{x} {v:.2f}" for x, v in jac.items()))
    state["lape_counts"] = {x: c for x, c in zip(langs, lape.counts().tolist())}
    cls = [N.classify(N.activation_probs(s)) for s in st]
    cls_full = N.classify(p)
    cc = cls_full.counts()
    per_layer = {c: cc[c].sum(0) if cc[c].dim() == 2 else cc[c] for c in ("specific", "related", "general")}
    members = lambda c: {name: _class_members(c, name) for name in ("specific", "related", "general")}  # noqa: E731
    rows = {"lape_ablation": row, "neuron_classes": claims.classes(ROWS["neuron_classes"][1],
                                "language-specific, language-related and language-agnostic neurons; their layer "
                                "distribution (Zhang et al. 2025)", per_layer, members(cls[0]), members(cls[1]), L * I,
                                departures="classes from each half of the fit texts; lambda chosen as in the "
                                "release (auto)")}
    return rows


def split_half_jaccard(selections, langs, L) -> dict:
    """{lang: |A & B| / |A | B|} of the LAPE neurons selected on each half of the fit texts (NaN: none in both)."""
    out = {}
    for k, x in enumerate(langs):
        a, b = ({(l, int(i)) for l in range(L) for i in sel.neurons[k][l].tolist()} for sel in selections)
        out[x] = len(a & b) / len(a | b) if a | b else float("nan")
    return out


def _class_members(c, name):
    """{(layer, neuron)} of one class of a NeuronClasses result."""
    sets = getattr(c, name)
    per_l = [sets] if name == "general" else sets
    return {(l, int(i)) for lang in per_l for l, idx in enumerate(lang) for i in idx.tolist()}


def measure_heads(steerer, tok, fit, dev, test, cfg, state):
    """LAHIS scores on the fit texts; mask each language's specific heads vs random heads in the same layers."""
    from .. import heads as hd
    L, H = steerer.num_layers, steerer.num_heads
    langs = list(fit)
    scores = {x: hd.lahis_scores(steerer, tok, fit[x][:cfg["n_lahis"]], batch_size=8, max_length=cfg["max_length"])
              for x in langs}
    state["scores"] = scores
    rep = max(2, round(0.8 * len(langs)))
    sets = hd.head_sets(scores, min_rep=rep)
    n = cfg["lahis_heads"]
    chosen = {x: (sets["specific"][x] + [h for h in hd.top_k_heads(scores[x], L * H)
                                         if h not in sets["specific"][x] and h not in sets["general"]])[:n]
              for x in langs}
    excl = {x: set(sets["top"][x]) | set(chosen[x]) for x in langs}

    def gate(ids):
        g = torch.ones(L * H, device=steerer.gate.device)
        g[list(ids)] = 0.0
        return g.view(L, H)

    def own(k):
        steerer.gate = gate(chosen[langs[k]])

    def rand(k, s):
        steerer.gate = gate(random_heads(chosen[langs[k]], L, H, s, exclude=excl[langs[k]]))
    test_n = {x: t[:cfg["n_nll"]] for x, t in test.items()}
    base, off, rnd = _ablate(steerer, tok, test_n, own, rand, cfg["seeds"])
    row = claims.ablation("LAHIS: a language's specific heads matter for that language",
                          "masking language X's language-specific heads raises X's loss more than the others' and "
                          "more than random heads (Liu et al. 2025)", base, off, rnd, langs,
                          departures=f"{n} heads per language (the paper's 2% of 72 heads is 1); general = in >= "
                          f"{rep} of {len(langs)} top lists; scores on {cfg['n_lahis']} fit paragraphs",
                          what="heads (same layers)")
    row["details"]["heads"] = {x: [f"{h // H}.{h % H}" for h in ids] for x, ids in chosen.items()}
    rows = {"lahis_ablation": row}
    if cfg["n_offtarget"] > 0:
        from .masks import offtarget_row
        rows["lahis_offtarget"] = offtarget_row(steerer, tok, test, chosen, excl, cfg)
    else:
        rows["lahis_offtarget"] = _missing("lahis_offtarget", cfg, f"not run at level {cfg['level']}: needs "
                                           "generations on >= 8 prompts per language (level quick or default)")
    return rows


def measure_steering(steerer, tok, fit, dev, test, cfg, state):
    from . import steer
    from ..steering.itlc import ITLC
    tgt = cfg["target"]
    langs = list(fit)
    nd = min(len(dev["en"]), max(16, cfg["n_prompts"] // 2))
    mk = lambda split, n, **kw: steer.Cells(steerer, tok, "en", tgt, steer.prompts_of(split["en"][:n]),   # noqa: E731
                                            steer.prompts_of(split[tgt][:n]), langs, cfg, **kw)
    dv, ts = mk(dev, nd), mk(test, cfg["n_prompts"])
    if "lape" not in state:
        measure_neurons(steerer, tok, fit, dev, test, cfg, state)
    rows = steer.lape_rows(steerer, tok, state["stats"], state["lape"], langs, dv, ts, cfg, tgt)
    itlc = ITLC.fit(steerer.model, tok, fit, layer=steerer.num_layers // 2, batch_size=16,
                    max_length=cfg["max_length"], epochs=cfg["itlc_epochs"])
    sample = cfg.get("itlc_sample")
    dv_s, ts_s = (mk(dev, nd, sample=sample), mk(test, cfg["n_prompts"], sample=sample)) if sample else (dv, ts)
    rows["itlc"] = steer.itlc_row(steerer, tok, itlc, dv_s, ts_s, cfg, tgt, refs=test[tgt][:cfg["n_prompts"]])
    state["generations"] = ts.base()["texts"][:8]
    return rows


def measure_choice(steerer, tok, fit, dev, test, cfg, state):
    from . import choice
    langs = [x for x in cfg["choice_langs"] if x in fit and x != "en"] or [cfg["target"]]
    rows = choice.claim_rows(steerer, tok, fit, dev, test, cfg, langs)
    rows["incline"] = choice.incline_row(steerer, tok, fit, dev, test, cfg, langs)
    return rows


def measure_alignment(steerer, tok, fit, dev, test, cfg, state):
    from . import choice
    sub = {x: t[:cfg["n_choice"]] for x, t in test.items()}
    acc = {x: float(choice.accuracy(steerer, tok, sub, x).float().mean()) for x in test if x != "en"}
    rows, curves = choice.alignment_rows(steerer, tok, test, cfg, acc)
    state["mexa"] = curves
    return rows


def measure_experts(steerer, tok, fit, dev, test, cfg, state):
    from .experts import experts_row
    return {"experts": experts_row(steerer, tok, fit, test, cfg)}


def measure_soft_mask(steerer, tok, fit, dev, test, cfg, state):
    from .masks import soft_mask_row
    from .. import heads as hd
    tgt = cfg["target"]
    scores = state.get("scores", {}).get(tgt)
    if scores is None:
        scores = hd.lahis_scores(steerer, tok, fit[tgt][:cfg["n_lahis"]], batch_size=8, max_length=cfg["max_length"])
    return {"soft_mask": soft_mask_row(steerer, tok, fit, test, cfg, scores, tgt)}


def settings(level="default", overrides=None) -> dict:
    """The settings of a level (COMMON, then LEVELS[level], then overrides), checked."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    cfg = dict(COMMON, **LEVELS[level])
    cfg.update(overrides or {}, level=level)
    small = {k: cfg[k] for k in ("n_nll", "n_prompts", "n_choice", "n_offtarget") if 0 < cfg[k] < cfg["seeds"]}
    if small:
        raise ValueError(f"{small} must be >= seeds ({cfg['seeds']}): item i is measured under control seed i mod "
                         "seeds, so fewer items would leave seeds unmeasured")
    return cfg


def _missing(key, cfg, why):
    step, claim, paper = ROWS[key]
    return claims.not_measured(claim.format(tgt=cfg["target"]), paper, why)


def run(model, tokenizer, *, corpus=None, langs=None, level="default", quick=False, out=None, name="model",
        steps=STEPS, seed=0, overrides=None, log=print, previous=None) -> dict:
    """Measure the claims; returns {"rows", "settings", "splits", "seconds", "errors", ...}; with `out` also
    writes the report (previous: an earlier record's rows for its verdict changes, default the one in `out`).
    corpus: {lang: parallel texts} (default: GNOME Help in the level's languages)."""
    import xlkernels
    from .. import corpus as cp
    level = "quick" if quick else level
    cfg = settings(level, overrides)
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise ValueError(f"steps {bad} unknown; choose from {', '.join(STEPS)}")
    steps = [s for s in STEPS if s in steps and (not cfg.get("steps") or s in cfg["steps"])]
    if corpus is None:
        corpus = cp.help_corpus(list(langs or cfg["langs"]))
        source = f"GNOME Help ({cp.PACKAGE} {cp.VERSION}, {cp.LICENSE})"
    else:
        if langs is not None:
            missing = [x for x in langs if x not in corpus]
            if missing:
                raise ValueError(f"langs {missing} are not in the corpus (has {', '.join(corpus)})")
            corpus = {x: corpus[x] for x in langs}
        source = "user corpus"
    if len(corpus) < 2 or "en" not in corpus:
        raise ValueError(f"need en and at least one more language, got {list(corpus)}")
    if len({len(t) for t in corpus.values()}) != 1:
        raise ValueError("reproduce needs a parallel corpus (the same number of aligned texts per language)")
    fit, dev, test = cp.split(corpus, cfg["fractions"], seed)
    n_test = len(test["en"])
    if n_test < cfg["seeds"]:     # a small corpus: fewer control seeds, so the rows say they cannot hold
        log(f"  only {n_test} test texts: {n_test} control seeds instead of {cfg['seeds']}")
        cfg["seeds"] = max(1, n_test)
    cfg["target"] = cfg["target"] if cfg["target"] in corpus else next(x for x in corpus if x != "en")
    steerer = model if hasattr(model, "record_neurons") else xlkernels.patch(model)
    steerer.reset()
    random.seed(seed)
    state, got, seconds, errors, why = {}, {}, {}, [], {}
    jobs = {"neurons": measure_neurons, "heads": measure_heads, "soft_mask": measure_soft_mask,
            "steering": measure_steering, "choice": measure_choice, "alignment": measure_alignment,
            "experts": measure_experts}
    for step in steps:
        t0 = time.perf_counter()
        try:
            got.update(jobs[step](steerer, tokenizer, fit, dev, test, cfg, state))
        except Exception as e:   # one failing step must not lose the others: its rows say so, exit code 1
            errors.append(f"{step}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            why[step] = f"the {step} step failed: {type(e).__name__}: {e}"
        finally:
            steerer.reset()
        seconds[step] = round(time.perf_counter() - t0, 1)
        log(f"  {step}: {seconds[step]} s")
    rows = []
    for key, (step, _, _) in ROWS.items():
        if key in got:
            row = got[key]
        elif step in why:
            row = _missing(key, cfg, why[step])
        elif step not in steps:
            row = _missing(key, cfg, f"not run at level {level}: needs the {step} step (`xlkernels reproduce`)"
                           if cfg.get("steps") and step not in cfg["steps"] else f"the {step} step was skipped")
        else:
            row = _missing(key, cfg, f"not measured at level {level} (see its settings)")
        rows.append(dict(row, key=key))
    report = {"model": name, "level": level, "corpus": source,
              "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
              "langs": list(corpus), "splits": cp.describe((fit, dev, test)), "seed": seed, "rows": rows,
              "seconds": seconds, "errors": errors,
              "environment": environment(next(steerer.model.parameters()).device),
              "plots_data": {k: state[k] for k in ("lape_counts", "mexa") if k in state}}
    if out is not None:
        write_report(report, out, previous)
    return report
