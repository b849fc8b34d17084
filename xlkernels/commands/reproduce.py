"""`xlkernels reproduce`: the seeds' central claims measured on one model, one row per claim."""
import sys
import time

from xlkernels.files import staged_dir

from ._common import add_corpus_arguments, add_model_arguments, add_out_argument, corpus_from_args, load_model_from_args

HELP = ("check each paper's claim on a model (LAPE, neuron classes, LAHIS, CLAIM, ITLC, INCLINE, MEXA, ANC, finding "
        "experts): one "
        "row per claim, against a matched random control, with a 95% interval: holds / does not hold / undecided")
EXAMPLES = """\
  xlkernels reproduce                         # embedded Gemma-3-270M on GNOME Help (7 languages), ./xlk_reproduce
  xlkernels reproduce --quick                 # fewer texts and prompts
  xlkernels reproduce --full                  # all test texts as prompts, 20 seeds
  xlkernels reproduce --langs en,de,ru,ja --out runs/repro
  xlkernels reproduce --model ~/models/Llama-3.2-1B --corpus wiki.jsonl --langs en,de,fr
  xlkernels reproduce --tiny llama --quick    # random tiny model: checks the plumbing in seconds
outputs in --out: report.md (table, departures, verdict changes, plots), reproduce.json (every number),
lape_layers.png, mexa.png. The default corpus is GNOME Help (Debian gnome-user-docs, installed by `make build`);
--corpus: JSONL {"text", "lang"} or TSV lang<TAB>text, parallel with en (same number of texts per language,
aligned by line), split into seeded fit / dev / test parts.
"""


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("--langs", default=None, help="comma-separated languages (default "
                   "en,de,fr,es,ru,zh_Hans,ja)")
    add_corpus_arguments(p, note=" (default: GNOME Help)")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true", help="fewer texts and prompts")
    level.add_argument("--full", action="store_true", help="every test text, 20 seeds (hours on a CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits (default 0)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: neurons, heads, soft_mask, "
                   "steering, choice, alignment, experts (their rows stay, undecided)")
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
    previous = rp.previous_rows(args.out)     # read before the staged files replace it
    with staged_dir(args.out) as out:
        report = rp.run(model, tok, corpus=corpus, langs=langs, level=level, out=out, name=name,
                        steps=[s for s in rp.STEPS if s not in skip], seed=args.seed, log=log, previous=previous)
    rp.print_summary(report["rows"])
    print(f"wrote {args.out}/report.md, reproduce.json and plots ({sum(report['seconds'].values()):.0f} s)")
    return 1 if report["errors"] else 0
