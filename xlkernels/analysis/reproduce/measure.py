"""`xlkernels reproduce`: measure the seeds' central claims on one model and write a report.

`run(model, tokenizer, ...)` measures every claim on a corpus split into a fit part (statistics, scores,
training: the first texts of each language) and a held-out part (losses: the last texts), turns each
measurement into a row with xlkernels.analysis.claims, and (with `out`) writes report.md, reproduce.json and
PNG plots (reproduce_report.py; `print_summary(rows)` prints the table). Levels: "quick" (the `make demo`
summary), "default", "full" (more languages, texts, seeds and the eval sweep).
"""
from __future__ import annotations

import random
import sys
import time
import traceback

import torch

from . import claims
from .report import format_table, print_summary, write_report  # noqa: F401 (this module's API)

LEVELS = {
    # langs, texts for statistics/scores/training, held-out texts, LAHIS texts, random-head seeds, soft-mask
    # train pairs, MEXA sentences, tokens per text
    "quick": dict(langs=("en", "de", "fr", "es"), n_fit=48, n_eval=16, n_lahis=12, seeds=3, n_train=24,
                  n_mexa=48, max_length=48, mask_batch=4, steer_prompts=8, steer_new_tokens=16,
                  strengths="quick"),
    "default": dict(langs=("en", "de", "fr", "es", "zh_Hans"), n_fit=96, n_eval=32, n_lahis=24, seeds=5,
                    n_train=48, n_mexa=100, max_length=48, mask_batch=1, steer_prompts=16, steer_new_tokens=24,
                    strengths=None),
    # `make demo`'s step 4 (the demo's own corpus; steering is left to the demo's step 3 and `xlkernels eval`)
    "demo": dict(langs=("en", "de", "fr"), n_fit=32, n_eval=8, n_lahis=8, seeds=2, n_train=12, n_mexa=32,
                 max_length=32, mask_batch=4, steer_prompts=4, steer_new_tokens=8, strengths="quick"),
    "full": dict(langs=("en", "de", "fr", "es", "ru", "zh_Hans", "ja", "ar"), n_fit=160, n_eval=64, n_lahis=64,
                 seeds=10, n_train=100, n_mexa=100, max_length=64, mask_batch=1, steer_prompts=32,
                 steer_new_tokens=32, strengths=None),
}
# strengths None: evaluate.DEFAULT_STRENGTHS (the eval sweep); "quick": QUICK_STRENGTHS
HEAD_FRAC = 0.02   # LAHIS masks / trains int(L*H*0.02) heads (methods.md 1.4), at least 1
NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "ru": "Russian", "zh_Hans": "Chinese",
         "ja": "Japanese", "ar": "Arabic", "it": "Italian", "pt": "Portuguese", "nl": "Dutch", "pl": "Polish"}


def split(corpus: dict, n_fit: int, n_eval: int):
    """(fit, held-out): the first n_fit and the last n_eval texts of each language (disjoint; both shrink when a
    language has fewer than n_fit + n_eval texts, the held-out part to at most half)."""
    fit, ev = {}, {}
    for lang, texts in corpus.items():
        if len(texts) < 2:
            raise ValueError(f"corpus[{lang!r}] needs at least 2 texts, has {len(texts)}")
        e = min(n_eval, len(texts) // 2)
        fit[lang], ev[lang] = texts[:min(n_fit, len(texts) - e)], texts[len(texts) - e:]
    return fit, ev


def is_parallel(corpus: dict, pivot: str = "en") -> bool:
    return pivot in corpus and len({len(t) for t in corpus.values()}) == 1


def qa_pairs(corpus: dict, lang: str, pivot: str = "en"):
    """(prompt, answer) pairs from a parallel corpus: translate the pivot sentence into `lang`; the loss is on
    the answer (the `lang` sentence) only."""
    name = NAMES.get(lang, lang)
    return [(f"{NAMES.get(pivot, pivot)}: {src}\n{name}:", " " + tgt) for src, tgt in zip(corpus[pivot], corpus[lang])]


@torch.no_grad()
def answer_loss(steerer, tok, pairs, gate, batch_size=8, max_length=128) -> float:
    """Mean NLL over all answer tokens of `pairs` with steerer.gate = gate (None: no mask)."""
    from ..heads.soft_mask import pairs_loss
    return pairs_loss(steerer, tok, pairs, gate, batch_size, max_length)


def _ones(steerer):
    return torch.ones(steerer.num_layers, steerer.num_heads, device=steerer.device)


def _gate(L, H, heads, value=0.0):
    g = torch.ones(L * H)
    g[list(heads)] = value
    return g.view(L, H)


def _nll(steerer, tok, corpus, cfg, gate=None):
    from ..neurons.deactivation import language_nll
    old = steerer.gate
    steerer.gate = _ones(steerer) if gate is None else gate
    try:
        return language_nll(steerer.model, tok, corpus, batch_size=16, max_length=cfg["max_length"])
    finally:
        steerer.gate = old


# ---------------------------------------------------------------------------------------------- measurements
def measure_neurons(steerer, tok, fit, ev, cfg, state):
    """LAPE statistics + selection on the fit texts, the deactivation matrix on the held-out texts, Zhang et
    al.'s classes on the same statistics. Rows: deactivation, layers, classes."""
    from .. import neurons as N
    from ..neurons.deactivation import deactivation_matrix
    stats = N.collect_stats(steerer, tok, fit, batch_size=16, max_length=cfg["max_length"], progress=False)
    p = N.activation_probs(stats)
    lape = N.lape(p)
    cls = N.classify(p)
    res = deactivation_matrix(steerer, tok, ev, lape.neurons, batch_size=16, max_length=cfg["max_length"],
                              progress=False)
    langs = list(fit)
    counts = lape.counts()
    state["lape_counts"] = {x: c for x, c in zip(langs, counts.tolist())}
    cc = cls.counts()
    row = claims.lape_deactivation(res["delta"], langs)
    row["details"].update(base_nll=res["base"].tolist(), n_neurons=dict(zip(langs, counts.sum(1).tolist())))
    return [row, claims.lape_layers(counts),
            claims.ternary_classes(cls.appear, int(cc["specific"].sum()), int(cc["related"].sum()),
                                   int(cc["general"].sum()), cls.lam, len(langs))]


def measure_heads(steerer, tok, fit, ev, cfg, state, seed=0):
    """LAHIS scores on the fit texts; mask each language's first int(L*H*0.02) language-specific heads and
    as many random heads (not in its top list; `seeds` draws) and measure the held-out losses."""
    from .. import heads as hd
    L, H = steerer.num_layers, steerer.num_heads
    langs = list(fit)
    scores = {x: hd.lahis_scores(steerer, tok, fit[x][:cfg["n_lahis"]], batch_size=cfg["n_lahis"],
                                 max_length=32) for x in langs}
    state["scores"] = scores
    sets = hd.head_sets(scores)
    n = max(1, int(L * H * HEAD_FRAC))
    base = _nll(steerer, tok, ev, cfg)
    K = len(langs)
    delta = torch.zeros(K, K, dtype=torch.float64)
    rnd = torch.zeros(K, cfg["seeds"], dtype=torch.float64)
    chosen = {}
    rng = random.Random(seed)
    for i, x in enumerate(langs):
        ids = sets["specific"][x][:n]
        chosen[x] = ids
        if not ids:
            continue
        delta[i] = _nll(steerer, tok, ev, cfg, _gate(L, H, ids)) - base
        pool = [h for h in range(L * H) if h not in set(sets["top"][x])]
        for s in range(cfg["seeds"]):
            pick = rng.sample(pool, min(len(ids), len(pool)))
            rnd[i, s] = _nll(steerer, tok, {x: ev[x]}, cfg, _gate(L, H, pick))[0] - base[i]
    row = claims.lahis_masking(delta, rnd, [len(chosen[x]) for x in langs], langs)
    row["details"].update(heads={x: [f"{h // H}.{h % H}" for h in ids] for x, ids in chosen.items()},
                          general=[f"{h // H}.{h % H}" for h in sets["general"]], base_nll=base.tolist(), seed=seed)
    return [row]


def measure_soft_mask(steerer, tok, fit, ev, cfg, state, lang=None, seed=0):
    """Train the gates of `lang`'s top int(L*H*0.02) LAHIS heads on translation pairs from the fit texts
    (2 epochs, AdamW lr 1e-2) and compare the held-out answer loss (and, at level full, random heads)."""
    from ..heads.soft_mask import default_k, train_soft_mask
    why = ("needs a parallel corpus with en" if not is_parallel(fit) or not is_parallel(ev) else
           "needs the LAHIS scores of the heads step" if "scores" not in state else None)
    if why:
        return [claims.make_row("Soft head mask: a few trained head gates help", "", f"undecided: {why}", None, {})]
    lang = lang or next(x for x in fit if x != "en")
    L, H = steerer.num_layers, steerer.num_heads
    k = default_k(L, H, HEAD_FRAC)
    train = qa_pairs(fit, lang)[:cfg["n_train"]]
    held = qa_pairs(ev, lang)
    mask = train_soft_mask(steerer, tok, train, scores=state["scores"][lang], k=k, epochs=2,
                           batch_size=cfg["mask_batch"], max_length=128)
    before = answer_loss(steerer, tok, held, None)
    after = answer_loss(steerer, tok, held, mask.gate)
    rnd = None
    if cfg.get("random_mask"):
        pick = random.Random(seed).sample(range(L * H), k)
        rmask = train_soft_mask(steerer, tok, train, heads=pick, epochs=2, batch_size=cfg["mask_batch"],
                                max_length=128)
        rnd = answer_loss(steerer, tok, held, rmask.gate)
    row = claims.soft_mask(before, after, k, len(train), len(held), lang, rnd)
    row["details"].update(heads=[f"{h // H}.{h % H}" for h in mask.heads], values=mask.values.tolist(),
                          train_losses=mask.losses)
    return [row]


def measure_mexa(steerer, tok, corpus, cfg, state):
    from ..align import mexa
    if not is_parallel(corpus):
        return [claims.make_row("MEXA: alignment with English peaks in the middle layers", "",
                                "undecided: needs a parallel corpus with en", None, {})]
    sub = {x: t[:cfg["n_mexa"]] for x, t in corpus.items()}
    res = mexa(steerer.model, tok, sub, pivot="en", poolings=("weighted",), anc=False, batch_size=16,
               max_length=cfg["max_length"])
    state["mexa"] = res["mexa"]["weighted"]
    row = claims.mexa_peak(res["mexa"]["weighted"])
    row["details"]["n"] = res["n"]
    return [row]


STEPS = ("neurons", "heads", "soft_mask", "mexa", "steering")


def run(model, tokenizer, *, corpus=None, langs=None, level="default", quick=False, out=None, name="model",
        steps=STEPS, seed=0, overrides=None, eval_fn=None, log=print) -> dict:
    """Measure the claims and return {"rows", "settings", "seconds", "errors", ...}; with `out` also write the
    report there. corpus: {lang: texts} (default: the embedded parallel corpus in `langs`); quick=True is
    level="quick"; overrides: settings to change (e.g. {"n_fit": 16}); eval_fn(steerer, tok, fit, ev, cfg, state)
    returns the steering rows (default: from analysis/evaluate.py when it is installed)."""
    import xlkernels
    level = "quick" if quick else level
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    cfg = dict(LEVELS[level], random_mask=level == "full")
    cfg.update(overrides or {})
    if cfg["strengths"] == "quick":
        cfg["strengths"] = QUICK_STRENGTHS
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise ValueError(f"steps {bad} unknown; choose from {', '.join(STEPS)}")
    if corpus is None:
        from ..data import parallel_corpus
        corpus = parallel_corpus(list(langs or cfg["langs"]))
    elif langs is not None:
        missing = [x for x in langs if x not in corpus]
        if missing:
            raise ValueError(f"langs {missing} are not in the corpus (has {', '.join(corpus)})")
        corpus = {x: corpus[x] for x in langs}
    if len(corpus) < 2:
        raise ValueError(f"need at least 2 languages, got {list(corpus)}")
    fit, ev = split(corpus, cfg["n_fit"], cfg["n_eval"])
    steerer = model if hasattr(model, "record_neurons") else xlkernels.patch(model)
    steerer.reset()
    state, rows, seconds, errors = {}, [], {}, []
    jobs = {"neurons": lambda: measure_neurons(steerer, tokenizer, fit, ev, cfg, state),
            "heads": lambda: measure_heads(steerer, tokenizer, fit, ev, cfg, state, seed),
            "soft_mask": lambda: measure_soft_mask(steerer, tokenizer, fit, ev, cfg, state, seed=seed),
            "mexa": lambda: measure_mexa(steerer, tokenizer, corpus, cfg, state),
            "steering": lambda: measure_steering(steerer, tokenizer, fit, ev, cfg, state, eval_fn)}
    for step in steps:
        t0 = time.perf_counter()
        try:
            new = jobs[step]()
        except Exception as e:   # one failing claim must not lose the others: an error row, exit code 1
            errors.append(f"{step}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            new = [claims.make_row(step, "", f"error: {type(e).__name__}: {e}", None, {})]
        finally:
            steerer.reset()
        seconds[step] = round(time.perf_counter() - t0, 1)
        rows += new
        log(f"  {step}: {seconds[step]} s")
    report = {"model": name, "level": level, "settings": {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in cfg.items()},
              "langs": list(corpus), "n_fit": {x: len(t) for x, t in fit.items()},
              "n_eval": {x: len(t) for x, t in ev.items()}, "seed": seed, "rows": rows, "seconds": seconds,
              "errors": errors, "plots_data": {k: state[k] for k in ("lape_counts", "mexa", "eval") if k in state}}
    if out is not None:
        write_report(report, out)
    return report


QUICK_STRENGTHS = {"shift": (4.0, 16.0), "itlc": (1.0, 4.0), "incline": (0.3, 1.0), "forcing": (1.0, 2.0),
                   "gate": (1.0, 2.0), "neurons": (None,)}


def steering_eval(steerer, tok, fit, ev, cfg, state):
    """Fit one plan per method on the fit texts (evaluate.fit_plans), steer held-out English prompts toward
    the target (de, else the first other language) over a strength sweep (evaluate.evaluate), and make one
    row per method from its best setting."""
    from ..evaluation import evaluate as E
    if "en" not in fit or not is_parallel(fit):
        return [claims.make_row("Steering", "", "undecided: needs a parallel corpus with en", None, {})]
    target = cfg.get("steer_target") or ("de" if "de" in fit else next(x for x in fit if x != "en"))
    plans, empty = {}, []
    for name, plan in E.fit_plans(steerer, tok, fit, "en", target, max_length=cfg["max_length"]).items():
        try:
            E.method_of(plan)
            plans[name] = plan
        except ValueError:   # e.g. no English LAPE neuron to switch off
            empty.append(name)
    prompts = ev["en"][:cfg["steer_prompts"]]
    res = E.evaluate(steerer, tok, plans, prompts, source="en", target=target, strengths=cfg["strengths"],
                     max_new_tokens=cfg["steer_new_tokens"])
    state["eval"] = res
    base = next(r for r in res["rows"] if r["plan"] == "unsteered")
    rows = []
    for name in plans:
        pts = [{"setting": "-" if r["strength"] is None else f"{E.STRENGTH_NAME[r['method']]} {r['strength']:g}",
                "target_rate": r["target_rate"], "source_rate": r["source_rate"], "nll": r["nll"],
                "repetition": r["repetition"], "example": r["generations"][0]}
               for r in res["rows"] if r["plan"] == name]
        row = claims.steering(f"{name} ({E.method_of(plans[name])}), en -> {target}", pts,
                              {"target_rate": base["target_rate"], "nll": base["nll"]})
        rows.append(row)
    return rows + [claims.make_row(f"Steering: {name}, en -> {target}", "steering switches the output language "
                                   "to the target (method's paper)", "undecided: the fit found nothing to steer "
                                   "with (empty plan)", None, {"method": name}) for name in empty]


def measure_steering(steerer, tok, fit, ev, cfg, state, eval_fn=None):
    if eval_fn is None:
        try:
            from ..evaluation import evaluate# noqa: F401 (analysis/evaluate.py, issue 12 part 2)
        except ImportError:
            return [claims.make_row("Steering", "steering switches the output language to the target",
                                    "not measured: analysis/evaluate.py is not available", None, {})]
        eval_fn = steering_eval
    return eval_fn(steerer, tok, fit, ev, cfg, state)
