"""`xlkernels reproduce`: the seeds' central claims measured on one model, one row per claim."""
import sys
import time

from xlkernels.files import staged_dir

from ._common import add_corpus_arguments, add_model_arguments, add_out_argument, corpus_from_args, load_model_from_args

HELP = ("check the papers' central claims on a model (LAPE, LAHIS, soft head mask, neuron classes, MEXA, "
        "steering): one row per claim with the measured value and holds / does not hold")
EXAMPLES = """\
  xlkernels reproduce                         # embedded Gemma-3-270M and parallel corpus, writes ./xlk_reproduce
  xlkernels reproduce --quick                 # fewer languages and texts (the `make demo` summary)
  xlkernels reproduce --full                  # 8 languages, more texts and seeds, random-head soft-mask baseline
  xlkernels reproduce --langs en,de,ru,ja --out runs/repro
  xlkernels reproduce --model ~/models/Llama-3.2-1B --corpus wiki.jsonl --langs en,de,fr
  xlkernels reproduce --tiny llama --quick    # random tiny model: checks the plumbing in seconds
outputs in --out: report.md (table + plots), reproduce.json (rows with every number), lape_deactivation.png,
lape_layers.png, lahis_masking.png, mexa.png. --corpus: JSONL {"text", "lang"} or TSV lang<TAB>text; the soft
mask and MEXA rows need a parallel corpus with en (same number of texts per language, aligned by line).
"""


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("--langs", default=None, help="comma-separated languages (default en,de,fr,es,zh_Hans; "
                   "quick: en,de,fr,es; full: en,de,fr,es,ru,zh_Hans,ja,ar)")
    add_corpus_arguments(p)
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true", help="fewer languages, texts and seeds")
    level.add_argument("--full", action="store_true", help="more languages, texts and seeds (tens of minutes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-head baselines (default 0)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: neurons, heads, soft_mask, "
                   "mexa, steering")
    add_out_argument(p, "xlk_reproduce")
    p.add_argument("--no-progress", action="store_true", help="no progress messages on stderr")


def run(args) -> int:
    from xlkernels.analysis.reproduce import measure as rp
    level = "quick" if args.quick else "full" if args.full else "default"
    langs = [x.strip() for x in args.langs.split(",") if x.strip()] if args.langs else None
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    bad = skip - set(rp.STEPS)
    if bad:
        raise ValueError(f"--skip {sorted(bad)} unknown; choose from {', '.join(rp.STEPS)}")
    corpus = corpus_from_args(args)
    log = (lambda *a: None) if args.no_progress else (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    model, tok, name = load_model_from_args(args, not args.no_progress)
    log(f"model {name} loaded in {time.perf_counter() - t0:.0f} s; level {level}")
    with staged_dir(args.out) as out:
        report = rp.run(model, tok, corpus=corpus, langs=langs, level=level, out=out, name=name,
                        steps=[s for s in rp.STEPS if s not in skip], seed=args.seed, log=log)
    rp.print_summary(report["rows"])
    print(f"wrote {args.out}/report.md, reproduce.json and plots ({sum(report['seconds'].values()):.0f} s)")
    return 1 if report["errors"] else 0
