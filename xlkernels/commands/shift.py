"""`xlkernels shift`: CLAIM-style per-head language shift vectors, saved as a steering plan (shift bank)."""
import json
import os
import sys
import time

from .heads import fmt_heads
from ._common import add_model_arguments, load_corpus, load_model_from_args

HELP = ("compute a language shift bank: per-head mean differences of attention outputs between languages "
        "over parallel prompts, on the heads a probe (or LAHIS) selects; saved as a steering plan")
EXAMPLES = """\
  xlkernels shift                                     # embedded model and corpus, pivot = mean of languages
  xlkernels shift --langs en,de,fr --pivot en --k 24 --alpha 4 --out runs/shift
  xlkernels shift --select importance --importance runs/heads/scores.safetensors
  xlkernels shift --tiny llama --n 16 --no-progress   # random tiny model (smoke test)
  then: xlkernels steer --plan runs/shift --target-lang de --prompt "The weather today is"
outputs in --out: plan.safetensors + plan.json (shift bank (K, L, H, D), languages, alpha), shift.json
(selected heads and their probe accuracy or importance per language)
"""


def add_arguments(p):
    add_model_arguments(p)
    d = p.add_argument_group("data")
    d.add_argument("--langs", default=None, help="comma-separated languages of the embedded corpus "
                   "(default: en,de,fr,es,ru,zh_Hans,ja,ar)")
    d.add_argument("--n", type=int, default=100, help="parallel prompts per language (default 100)")
    d.add_argument("--texts", action="append", default=[], metavar="LANG=FILE",
                   help="your own ALIGNED texts for LANG (line i = the same prompt in every language)")
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--max-length", type=int, default=128)
    a = p.add_argument_group("shift")
    a.add_argument("--pivot", default="mean", help="'mean' (mean of the languages) or a language: each bank row "
                   "is mean(lang) - mean(pivot) (default mean)")
    a.add_argument("--position", default="last", choices=("last", "mean"),
                   help="head output at the last token (CLAIM) or averaged over tokens")
    a.add_argument("--select", default="probe", choices=("probe", "importance", "all"),
                   help="how heads are chosen per language (default: held-out probe accuracy)")
    a.add_argument("--probe", default="logistic", choices=("logistic", "centroid"))
    a.add_argument("--importance", default=None, metavar="FILE",
                   help="scores.safetensors written by `xlkernels heads` (for --select importance)")
    a.add_argument("--k", type=int, default=None, help="heads per language (default 5%% of L*H, at least 1)")
    a.add_argument("--train-frac", type=float, default=0.75, help="probe train split (by prompt id)")
    a.add_argument("--alpha", type=float, default=1.0, help="strength stored in the plan (steer can override)")
    a.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="xlk_shift", help="output directory (default ./xlk_shift)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def _importance(path, langs):
    from safetensors.torch import load_file
    if not path:
        raise ValueError("--select importance needs --importance FILE (scores.safetensors from `xlkernels heads`)")
    t = load_file(os.path.expanduser(path))
    out = {x: t.get(f"scores.{x}") for x in langs}
    missing = [x for x, v in out.items() if v is None]
    if missing:
        raise ValueError(f"--importance {path} has no scores for {missing}")
    return out


def run(args) -> int:
    import xlkernels
    from xlkernels.analysis import shift as sh
    from xlkernels.analysis.plan import SteeringPlan, model_meta

    for name in ("n", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.k is not None and args.k < 1:
        raise ValueError("--k must be >= 1")
    progress = not args.no_progress
    model, tok, name = load_model_from_args(args, progress)
    corpus = load_corpus(args, args.n)
    if len(corpus) < 2:
        raise ValueError("--langs must name at least 2 languages")
    if len({len(t) for t in corpus.values()}) != 1:
        raise ValueError("the texts must be aligned: every language needs the same number of prompts")
    if args.pivot != "mean" and args.pivot not in corpus:
        raise ValueError(f"--pivot must be 'mean' or one of {list(corpus)}, got {args.pivot!r}")
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
    plan = SteeringPlan(shift=bank.bank, alpha=args.alpha, languages=bank.languages, meta=meta)
    os.makedirs(args.out, exist_ok=True)
    plan.save(os.path.join(args.out, "plan.safetensors"))
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
    with open(os.path.join(args.out, "shift.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {args.out}/plan.safetensors, plan.json, shift.json")
    return 0
