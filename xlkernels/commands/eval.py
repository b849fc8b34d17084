"""`xlkernels eval`: success rate and fluency cost of steering plans on held-out prompts, beside the
unsteered model (analysis/evaluation/evaluate.py). On GNOME Help's splits (analysis/corpus.py) plans are fitted
on fit, each plan's strength is chosen by a sweep on dev prompts and reported on test prompts; with --prompt
the sweep is reported as it is."""
import os
import sys
import time

from xlkernels.files import staged_dir

from ._common import add_corpus_arguments, add_model_arguments, add_out_argument, corpus_from_args, load_model_from_args
from ._files import file_option

HELP = ("evaluate steering plans on held-out prompts beside the unsteered model: target/source language rate, "
        "fluency (NLL under the unsteered model), repetition, tokens/s; sweeps the strength; JSON, Markdown, PNG")
EXAMPLES = """\
  xlkernels eval --fit all                          # fit en -> de on GNOME Help, strength chosen on dev, test
  xlkernels eval --plan claim=runs/shift --plan itlc=runs/itlc --target de --strengths claim=4,16,64
  xlkernels eval --fit lape,claim --target fr --n-prompts 32 --max-new-tokens 32 --out runs/eval_fr
  xlkernels eval --fit claim --steer-tokens prompt  # head steering in the prefill only
  xlkernels eval --tiny llama --fit lape,claim --n-fit 12 --n-prompts 3 --no-progress   # smoke test
strengths: alpha (claim shift bank, itlc), sigma (incline), set-value scale (lape forcing), gate scale
(lahis / soft-mask gate plans: gate = max(0, 1 + s (g - 1))); neuron deactivation has none. Default sweeps:
""" + "\n".join(f"  {m:<8} {', '.join('-' if v is None else f'{v:g}' for v in vals)}"
                for m, vals in __import__("xlkernels.analysis.evaluate", fromlist=["x"]).DEFAULT_STRENGTHS.items()) + """
outputs in --out: eval.json (every generation), eval.md (the table), eval.png (success vs fluency, one curve
per plan); fitted plans under plans/<method>/ (give them back with --plan).
"""


def add_arguments(p):
    add_model_arguments(p)
    s = p.add_argument_group("plans")
    file_option(s, "--plan", kind="named-plan", action="append", default=[], metavar="NAME=PATH",
                   help="a saved plan (SteeringPlan directory/.safetensors or a LAPE forcing.safetensors); repeatable")
    s.add_argument("--fit", default=None, metavar="METHODS",
                   help="fit plans on the corpus: comma list of lape,deactivate,claim,lahis,itlc,incline or 'all'")
    s.add_argument("--strengths", action="append", default=[], metavar="[NAME=]V1,V2",
                   help="strengths for one plan or method (NAME=...) or for all plans; repeatable "
                        "(default: a sweep per method, see below); 'own' = each plan's saved setting")
    d = p.add_argument_group("data")
    d.add_argument("--source", default="en", help="the prompts' language (default en)")
    d.add_argument("--target", default="de", help="the language to steer toward (default de)")
    d.add_argument("--langs", default=None, help="corpus languages for --fit (default en,de,fr,es + source/target)")
    add_corpus_arguments(d, note="; PARALLEL: text i is the same sentence in every language")
    d.add_argument("--n-fit", type=int, default=96, help="paragraphs per language to fit on (default 96)")
    d.add_argument("--n-prompts", type=int, default=16, help="source prompts from the dev split (strength chosen) "
                   "and as many from the test split (reported) (default 16)")
    d.add_argument("--prompt", action="append", default=[], help="prompt text instead of held-out corpus texts")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=24)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--steer-tokens", default="all", choices=("all", "prompt", "generated"),
                   help="where head/neuron steering acts (default all tokens)")
    g.add_argument("--lid-langs", default=None, help="candidate languages for the language identifier "
                   "(default: all it knows)")
    o = p.add_argument_group("output")
    add_out_argument(o, "xlk_eval")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_strengths(specs):
    """--strengths specs -> None (each plan's own setting) or {name or method: list}: DEFAULT_STRENGTHS,
    replaced for every method by a spec without NAME=, then per NAME (a plan name or a method)."""
    from xlkernels.analysis.evaluation.evaluate import DEFAULT_STRENGTHS
    if specs == ["own"]:
        return None
    out, keyed = dict(DEFAULT_STRENGTHS), {}
    for spec in specs:
        key, _, vals = spec.rpartition("=")
        try:
            nums = [float(v) for v in vals.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--strengths {spec!r}: values must be numbers, e.g. claim=1,4,16") from None
        if not nums:
            raise ValueError(f"--strengths {spec!r} has no values")
        if key:
            keyed[key] = nums
        else:
            out.update({m: nums for m in DEFAULT_STRENGTHS if m != "neurons"})
    out.update(keyed)
    return out


def _splits(args, corpus=None):
    """(fit {lang: paragraphs}, dev prompts, test prompts) from the seeded fit / dev / test splits of a parallel
    corpus (default GNOME Help, analysis/corpus.py); prompts are the first 60% of each source paragraph."""
    from xlkernels.analysis import corpus as cp
    from xlkernels.analysis.reproduce.steer import prompts_of
    langs = args.langs.split(",") if args.langs else ["en", "de", "fr", "es"]
    langs = ["en"] * ("en" not in langs) + langs + [x for x in (args.source, args.target) if x not in langs + ["en"]]
    if corpus is not None:
        missing = [x for x in ("en", args.source, args.target) if x not in corpus]
        if missing:
            raise ValueError(f"--corpus lacks {missing} (needs en, --source and --target; it has {list(corpus)})")
    fit, dev, test = cp.split(cp.help_corpus(langs) if corpus is None else corpus)
    have = {"--n-fit": (args.n_fit, len(fit["en"])), "--n-prompts": (args.n_prompts, min(len(dev["en"]),
                                                                                         len(test["en"])))}
    for flag, (want, n) in have.items():
        if want > n:
            raise ValueError(f"{flag} {want}: the corpus has {n} aligned paragraphs in that split for {langs}")
    return ({x: t[:args.n_fit] for x, t in fit.items()}, prompts_of(dev[args.source][:args.n_prompts]),
            prompts_of(test[args.source][:args.n_prompts]))


def run(args) -> int:
    import xlkernels
    from xlkernels.analysis.evaluation import evaluate as ev

    methods = []
    if args.fit:
        methods = list(ev.FIT_METHODS) if args.fit == "all" else [m.strip() for m in args.fit.split(",") if m.strip()]
        bad = [m for m in methods if m not in ev.FIT_METHODS]
        if bad or not methods:
            raise ValueError(f"--fit: {bad or args.fit!r} not among {', '.join(ev.FIT_METHODS)} (or 'all')")
    if not methods and not args.plan:
        raise ValueError("nothing to evaluate: give --plan NAME=PATH and/or --fit METHODS")
    strengths = parse_strengths(args.strengths)
    for flag, v in (("--n-fit", args.n_fit), ("--n-prompts", args.n_prompts), ("--max-new-tokens", args.max_new_tokens),
                    ("--batch-size", args.batch_size)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    progress = not args.no_progress
    model, tok, name = load_model_from_args(args, progress)
    steerer = xlkernels.patch(model)
    plans = {}
    for spec in args.plan:
        key, sep, path = spec.partition("=")
        if not sep or not key or not path:
            raise ValueError(f"--plan must be NAME=PATH, got {spec!r}")
        if key in plans:
            raise ValueError(f"--plan: the name {key!r} is used twice")
        plans[key] = ev.load_plan(os.path.expanduser(path), model=steerer)
    prompts, dev = list(args.prompt), None
    if methods or not prompts:
        fit, dev, test = _splits(args, corpus_from_args(args))
        if not prompts:
            prompts = test
    t0 = time.perf_counter()
    if methods:
        print(f"fitting {', '.join(methods)} on {args.n_fit} texts of {', '.join(fit)} ({args.source} -> "
              f"{args.target})", file=sys.stderr)
        fitted = ev.fit_plans(steerer, tok, fit, args.source, args.target, methods, progress=progress)
        clash = [m for m in fitted if m in plans]
        if clash:
            raise ValueError(f"--plan name {clash[0]!r} clashes with a fitted method's name")
        with staged_dir(args.out) as out:
            for m, plan in fitted.items():
                plan.save(os.path.join(out, "plans", m))
        plans.update(fitted)
    fit_s = time.perf_counter() - t0
    lid = args.lid_langs.split(",") if args.lid_langs else None
    print(f"model {name}; {len(prompts)} prompts ({args.source}), target {args.target}; plans: "
          f"{', '.join(f'{k} ({ev.method_of(v)})' for k, v in plans.items())}", file=sys.stderr)
    kw = dict(source=args.source, target=args.target, strengths=strengths, max_new_tokens=args.max_new_tokens,
              batch_size=args.batch_size, lid_langs=lid, steer_tokens=args.steer_tokens, progress=progress)
    if dev is not None and not args.prompt:
        res = ev.evaluate_held_out(steerer, tok, plans, dev, prompts, **kw)
    else:
        res = ev.evaluate(steerer, tok, plans, prompts, **kw)
    res.update(model=name, fit_seconds=round(fit_s, 1), eval_seconds=round(time.perf_counter() - t0 - fit_s, 1))
    with staged_dir(args.out) as out:
        ev.save(res, out, title=f"{name}: {args.source} -> {args.target}, success vs fluency")
    print(ev.to_markdown(res))
    if "chosen" in res:
        print(f"strength per plan chosen on {len(res['dev_prompts'])} dev prompts (highest {args.target} rate with "
              f"an NLL cost <= {res['max_nll_delta']:g}), reported above on {len(prompts)} test prompts:")
        for k, c in res["chosen"].items():
            print(f"  {k:<12} {'-' if c['strength'] is None else format(c['strength'], 'g')}"
                  + ("" if c["within_cost"] else "  (no dev strength within the cost: the best regardless)"))
    best = ev.best(res) if "chosen" not in res else {}
    if best:
        print("best setting per plan (highest target rate, then lowest NLL):")
        for k, r in best.items():
            st = "-" if r["strength"] is None else f"{ev.STRENGTH_NAME[r['method']]} {r['strength']:g}"
            print(f"  {k:<12} {st:<22} {args.target} {100 * r['target_rate']:.0f}%  NLL {r['nll']:.2f} "
                  f"({r['nll_delta']:+.2f})")
    print(f"wrote {args.out}/eval.json, eval.md, eval.png")
    return 0
