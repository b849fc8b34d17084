"""`xlkernels align`: cross-lingual alignment per layer (MEXA, and ANC) against a pivot language."""
import json
import sys
import time

from xlkernels.files import atomic_path

from ._common import add_corpus_arguments, add_model_arguments, corpus_from_args, load_model_from_args
from ._files import file_option

HELP = "cross-lingual alignment per layer: MEXA (mutual nearest-neighbour retrieval) and ANC vs a pivot"
EXAMPLES = """\
  xlkernels align                                      # embedded Gemma-3-270M, embedded parallel corpus
  xlkernels align --langs en,de,ja,ar --n 100 --pooling weighted,last --json runs/align.json
  xlkernels align --model ~/models/Qwen2.5-0.5B --texts en=flores.en.txt --texts de=flores.de.txt
  xlkernels align --tiny llama --n 16 --no-progress    # random tiny model (smoke test)
outputs: --json (per-layer scores, mean/max over layers; default align.json) and --plot (MEXA per layer
with ANC dashed; default align.png). Layer 0 is the embedding output.
"""


def add_arguments(p):
    add_model_arguments(p)
    d = p.add_argument_group("data")
    d.add_argument("--langs", default=None, help="comma-separated languages of the embedded corpus, pivot "
                   "included (default: en,de,fr,es,ru,zh_Hans,ja,ar)")
    d.add_argument("--n", type=int, default=100, help="parallel sentences per language (default 100, as MEXA)")
    add_corpus_arguments(d, note="; PARALLEL: text i is the same sentence in every language")
    d.add_argument("--pivot", default="en", help="pivot language (default en)")
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--max-length", type=int, default=512)
    m = p.add_argument_group("metric")
    m.add_argument("--pooling", default="weighted,last",
                   help="comma-separated poolings: weighted (MEXA default, w_t = t), last, mean")
    m.add_argument("--no-anc", action="store_true", help="skip ANC")
    o = p.add_argument_group("output")
    file_option(o, "--json", kind="out-file", default="align.json", metavar="PATH",
                help="result JSON (default align.json)")
    file_option(o, "--plot", kind="out-file", default="align.png", metavar="PATH",
                help="MEXA per-layer plot (default align.png)")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--force", action="store_true", help="replace an existing --json / --plot file")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def _corpus(args):
    from xlkernels.analysis.data import LANGS_DEFAULT, parallel_corpus
    corpus = corpus_from_args(args, args.n)
    if corpus is not None:
        sizes = {l: len(t) for l, t in corpus.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"--corpus / --texts are not parallel (texts per language: {sizes})")
        return corpus
    langs = [x for x in args.langs.split(",") if x] if args.langs else list(LANGS_DEFAULT)
    if args.pivot not in langs:
        langs = [args.pivot] + langs
    return parallel_corpus(langs, n=args.n)


def run(args) -> int:
    from xlkernels.analysis import align
    from xlkernels.analysis import plots
    if args.n < 2:
        raise ValueError(f"--n must be >= 2, got {args.n}")
    poolings = tuple(x.strip() for x in args.pooling.split(",") if x.strip())
    for p in poolings:
        if p not in align.POOLINGS:
            raise ValueError(f"--pooling: unknown pooling {p!r} (choose from {', '.join(align.POOLINGS)})")
    progress = not args.no_progress
    corpus = _corpus(args)
    t0 = time.perf_counter()
    model, tok, name = load_model_from_args(args, progress=progress)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = align.mexa(model, tok, corpus, pivot=args.pivot, poolings=poolings, anc=not args.no_anc,
                     batch_size=args.batch_size, max_length=args.max_length, progress=progress)
    res.update(model=name, seconds={"load": round(t_load, 2), "metrics": round(time.perf_counter() - t0, 2)})
    with atomic_path(args.json) as tmp, open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    p0 = poolings[0]
    print(f"{name}: MEXA vs {args.pivot}, n={res['n']}, {res['num_layers']} layers (0 = embeddings)")
    print(f"{'lang':<10}" + "".join(f"{p + ' mean':>15}{p + ' max':>14}" for p in poolings)
          + ("     ANC mean" if "anc" in res else ""))
    for lang in res["langs"]:
        row = f"{lang:<10}" + "".join(f"{res['mexa_mean'][p][lang]:>15.3f}{res['mexa_max'][p][lang]:>14.3f}"
                                      for p in poolings)
        if "anc" in res:
            row += f"{res['anc_mean'][lang]:>13.3f}"
        print(row)
    print(f"wrote {args.json}", file=sys.stderr)
    if not args.no_plot:
        with atomic_path(args.plot) as tmp:
            plots.mexa_curve(res, tmp, pooling=p0, title=f"{name}: MEXA per layer ({p0} pooling)")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
