"""`xlkernels shift`: language steering fitted on parallel prompts, saved as a steering plan.

--method claim (default): CLAIM-style per-head shift bank; itlc: ITLC residual language vectors (LDA);
incline: INCLINE per-layer maps W_l from --src to English."""
import json
import os
import sys
import time

from xlkernels.files import staged_dir

from ._common import add_corpus_arguments, add_model_arguments, add_out_argument, load_corpus, load_model_from_args
from ._files import file_option
from .heads import fmt_heads, load_scores

HELP = ("fit language steering on parallel prompts and save it as a steering plan: a CLAIM shift bank (per-head "
        "mean differences on probe/LAHIS-selected heads), ITLC residual language vectors, or INCLINE maps")
EXAMPLES = """\
  xlkernels shift                                     # embedded model and corpus, pivot = mean of languages
  xlkernels shift --langs en,de,fr --pivot en --k 24 --alpha 4 --out runs/shift
  xlkernels shift --select importance --importance runs/heads/scores.safetensors
  xlkernels shift --tiny llama --n 16 --no-progress   # random tiny model (smoke test)
  xlkernels shift --method itlc --langs en,de,fr,ja --alpha 0.5 --out runs/itlc     # LDA language vectors
  xlkernels shift --method incline --langs en,de --src de --sigma 0.3 --out runs/incline
  xlkernels shift --tiny llama --method itlc --n 16 --no-progress
  then: xlkernels steer --plan runs/shift --target-lang de --prompt "The weather today is"
outputs in --out: plan.safetensors + plan.json, shift.json. claim: shift bank (K, L, H, D), languages, alpha;
shift.json has the selected heads and their probe accuracy or importance per language. itlc: the ITLC state
(itlc.* tensors, layer, alpha); shift.json has the probe accuracy and |u_lang|. incline: W (L, E, E), src, sigma;
shift.json has |W_l| and the fit's relative residual per layer.
"""


def add_arguments(p):
    add_model_arguments(p)
    d = p.add_argument_group("data")
    d.add_argument("--langs", default=None, help="comma-separated languages of the embedded corpus "
                   "(default: en,de,fr,es,ru,zh_Hans,ja,ar)")
    d.add_argument("--n", type=int, default=100, help="parallel prompts per language (default 100)")
    add_corpus_arguments(d, note="; ALIGNED: line i = the same prompt in every language")
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--max-length", type=int, default=128)
    p.add_argument("--method", default="claim", choices=("claim", "itlc", "incline"),
                   help="claim: per-head shift bank (default); itlc: residual language vectors; incline: W_l maps")
    a = p.add_argument_group("shift (--method claim)")
    a.add_argument("--pivot", default="mean", help="'mean' (mean of the languages) or a language: each bank row "
                   "is mean(lang) - mean(pivot) (default mean)")
    a.add_argument("--position", default="last", choices=("last", "mean"),
                   help="head output at the last token (CLAIM) or averaged over tokens")
    a.add_argument("--select", default="probe", choices=("probe", "importance", "all"),
                   help="how heads are chosen per language (default: held-out probe accuracy)")
    a.add_argument("--probe", default="logistic", choices=("logistic", "centroid"))
    file_option(a, "--importance", kind="scores", default=None, metavar="FILE",
                   help="scores.safetensors written by `xlkernels heads` (for --select importance)")
    a.add_argument("--k", type=int, default=None, help="heads per language (default 5%% of L*H, at least 1)")
    a.add_argument("--train-frac", type=float, default=0.75, help="probe train split (by prompt id)")
    a.add_argument("--alpha", type=float, default=None, help="strength stored in the plan (steer can override; "
                   "default 1 for claim, 0.5 for itlc)")
    a.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("itlc")
    t.add_argument("--layer", type=int, default=None, help="hidden_states index to fit and inject after "
                   "(default num_layers // 2: the output of block layer-1)")
    t.add_argument("--epochs", type=int, default=10, help="probe epochs (default 10, as the released code)")
    t.add_argument("--lr", type=float, default=1e-3, help="probe learning rate (default 1e-3)")
    i = p.add_argument_group("incline")
    i.add_argument("--src", default=None, help="source language mapped to English (default: the first non-en "
                   "language of --langs); the corpus must contain en")
    i.add_argument("--sigma", type=float, default=0.3, help="edit strength stored in the plan (default 0.3; the "
                   "paper tunes it per task on dev data over -1..1, see incline.select_sigma)")
    i.add_argument("--site", default="block", choices=("block", "mlp"),
                   help="representation edited: decoder block output (default) or MLP output (released code)")
    o = p.add_argument_group("output")
    add_out_argument(o, "xlk_shift")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def _importance(path, langs):
    if not path:
        raise ValueError("--select importance needs --importance FILE (scores.safetensors from `xlkernels heads`)")
    t = load_scores(path)[0]
    out = {x: t.get(x) for x in langs}
    missing = [x for x, v in out.items() if v is None]
    if missing:
        raise ValueError(f"--importance {path} has no scores for {missing}")
    return out


def run(args) -> int:
    import xlkernels
    from xlkernels.analysis.steering import shift as sh
    from xlkernels.analysis.steering.plan import SteeringPlan, model_meta

    for name in ("n", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.k is not None and args.k < 1:
        raise ValueError("--k must be >= 1")
    if args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    progress = not args.no_progress
    model, tok, name = load_model_from_args(args, progress)
    corpus = load_corpus(args, args.n)
    if len(corpus) < 2:
        raise ValueError("--langs must name at least 2 languages")
    if len({len(t) for t in corpus.values()}) != 1:
        raise ValueError("the texts must be aligned: every language needs the same number of prompts")
    if args.pivot != "mean" and args.pivot not in corpus:
        raise ValueError(f"--pivot must be 'mean' or one of {list(corpus)}, got {args.pivot!r}")
    if args.method != "claim":
        return _latent(args, model, tok, name, corpus)
    importance = _importance(args.importance, corpus) if args.select == "importance" else None
    steerer = xlkernels.patch(model)
    steerer.reset()
    L, H = steerer.num_layers, steerer.num_heads
    print(f"model {name}: {L} layers x {H} heads x {steerer.head_dim} dims; languages {', '.join(corpus)}; "
          f"{len(next(iter(corpus.values())))} prompts each", file=sys.stderr)
    t0 = time.perf_counter()
    outputs = {x: sh.head_outputs(steerer, tok, texts, position=args.position, batch_size=args.batch_size,
                                  max_length=args.max_length, progress=progress) for x, texts in corpus.items()}
    bank = sh.shift_bank(outputs, pivot=args.pivot, k=args.k, select=args.select, importance=importance,
                         probe=args.probe, train_frac=args.train_frac, seed=args.seed)
    secs = round(time.perf_counter() - t0, 3)

    meta = model_meta(steerer)
    meta.update(model=name, source="xlkernels shift", pivot=args.pivot, position=args.position,
                select=args.select, probe=args.probe, n=len(next(iter(corpus.values()))))
    alpha = 1.0 if args.alpha is None else args.alpha
    plan = SteeringPlan(shift=bank.bank, alpha=alpha, languages=bank.languages, meta=meta)
    info = {"model": name, "pivot": args.pivot, "select": args.select, "seconds": secs, "languages": {}}
    print(f"{'lang':<8}{'heads':>6}{'score':>8}{'|shift|':>9}  heads (layer.head)")
    for r, x in enumerate(bank.languages):
        ids = bank.heads[r].flatten().nonzero().flatten()
        sc = bank.scores[r].flatten()[ids]
        order = sc.argsort(descending=True)
        ids, sc = ids[order].tolist(), sc[order].tolist()
        norm = float(bank.bank[r].norm())
        info["languages"][x] = {"heads": ids, "scores": sc, "shift_norm": norm}
        mean = sum(sc) / len(sc) if sc else float("nan")
        print(f"{x:<8}{len(ids):>6}{mean:>8.3f}{norm:>9.3f}  {fmt_heads(ids, H) or '-'}")
    return _save(args.out, plan, info)


def _save(out_dir, plan, info):
    with staged_dir(out_dir) as out:
        plan.save(os.path.join(out, "plan.safetensors"))
        with open(os.path.join(out, "shift.json"), "w") as f:
            json.dump(info, f, indent=1)
    print(f"wrote {out_dir}/plan.safetensors, plan.json, shift.json")
    return 0


def _latent(args, model, tok, name, corpus):
    """--method itlc / incline: fit on the HF model (unpatched) and save the plan."""
    from xlkernels.analysis.steering.plan import SteeringPlan, model_meta

    meta = model_meta(model)
    L = meta["num_layers"]
    meta.update(model=name, source="xlkernels shift", method=args.method, n=len(next(iter(corpus.values()))))
    n = meta["n"]
    t0 = time.perf_counter()
    info = {"model": name, "method": args.method, "languages": list(corpus), "n": n}
    if args.method == "itlc":
        from xlkernels.analysis.steering.itlc import ITLC
        layer = L // 2 if args.layer is None else args.layer
        if not 1 <= layer <= L - 1:
            raise ValueError(f"--layer must be in [1, {L - 1}] for this {L}-layer model, got {layer}")
        print(f"model {name}: ITLC at hidden_states[{layer}]; languages {', '.join(corpus)}; {n} texts each",
              file=sys.stderr)
        it = ITLC.fit(model, tok, corpus, layer=layer, batch_size=args.batch_size, max_length=args.max_length,
                      epochs=args.epochs, lr=args.lr, seed=args.seed)
        alpha = 0.5 if args.alpha is None else args.alpha
        plan = SteeringPlan(itlc=it, itlc_alpha=alpha, meta=meta)
        norms = {x: float(it.back[k].norm()) for k, x in enumerate(it.langs)}
        info.update(layer=layer, alpha=alpha, u_norm=norms,
                    accuracy=None if it.accuracy != it.accuracy else it.accuracy,
                    components=int(it.scalings.shape[1]))
        print(f"probe accuracy (held out) {it.accuracy:.3f}; {it.scalings.shape[1]} LDA dims; alpha {alpha:g}")
        for x, v in norms.items():
            print(f"{x:<8}|u| {v:.3f}  active dims {int(it.active[it.langs.index(x)].sum())}")
    else:
        from xlkernels.analysis.steering import latent
        from xlkernels.analysis.steering.incline import INCLINE
        if "en" not in corpus:
            raise ValueError(f"--method incline maps to English: --langs must contain en, got {list(corpus)}")
        src = args.src or next((x for x in corpus if x != "en"), None)
        if src not in corpus or src == "en":
            raise ValueError(f"--src must be a non-English language of {list(corpus)}, got {src!r}")
        if len(corpus[src]) != len(corpus["en"]):
            raise ValueError("the texts must be aligned: --src and en need the same number of prompts")
        print(f"model {name}: INCLINE {src} -> en at every {args.site} output; {n} pairs", file=sys.stderr)
        inc = INCLINE.fit(model, tok, corpus[src], corpus["en"], site=args.site, n=n, batch_size=args.batch_size,
                          max_length=args.max_length, src=src)
        plan = SteeringPlan(incline=inc, sigma=args.sigma, meta=meta)
        # fit quality on the (unaugmented) pairs: ||X_src W - X_en|| / ||X_en|| per layer
        kw = dict(site=args.site, batch_size=args.batch_size, max_length=args.max_length)
        xs = latent.pooled_states(model, tok, corpus[src], **kw)
        xe = latent.pooled_states(model, tok, corpus["en"], **kw)
        resid = ((xs @ inc.W - xe).norm(dim=(1, 2)) / xe.norm(dim=(1, 2)).clamp_min(1e-12)).tolist()
        wn = inc.W.norm(dim=(1, 2)).tolist()
        info.update(src=src, site=args.site, sigma=args.sigma, W_norm=wn, rel_residual=resid)
        print(f"{'layer':<6}{'|W|':>9}{'resid':>8}")
        for l, (a, b) in enumerate(zip(wn, resid)):
            print(f"{l:<6}{a:>9.3f}{b:>8.3f}")
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return _save(args.out, plan, info)
