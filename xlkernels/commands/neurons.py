"""`xlkernels neurons`: per-language FFN neuron statistics, LAPE language-specific neurons, the
specific/related/general classification (lambda auto-sweep) and, optionally, LAPE's deactivation matrix."""
import json
import os
import sys
import time

from xlkernels.files import staged_dir

from ._common import add_corpus_arguments, add_model_arguments, add_out_argument, load_corpus, load_model_from_args

HELP = ("find language neurons: per-language activation statistics in one pass, LAPE language-specific "
        "neurons, specific/related/general classes and the deactivation (loss change) matrix")
EXAMPLES = """\
  xlkernels neurons                                   # embedded Gemma-3-270M, embedded parallel corpus
  xlkernels neurons --langs en,de,fr,ja --n 300 --deactivate --out runs/neurons
  xlkernels neurons --model ~/models/Qwen2.5-0.5B --texts en=wiki.en.txt --texts de=wiki.de.txt --packing
  xlkernels neurons --tiny llama --n 20 --no-progress   # random tiny model (smoke test)
  xlkernels neurons --engine vllm --langs en,de,fr --n 500   # statistics inside vLLM (xlkernels.vllm)
outputs in --out: summary.json, stats.safetensors (NeuronStats, fields (L, K, I)), neurons.safetensors
(lape.<lang>.<layer>, specific.*, related.*, general.all.<layer>: neuron ids), neurons.png
"""


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="where the statistics run: the patched "
                   "HF model (default) or vLLM (needs vllm; --model must be a local HF directory; no --tiny)")
    d = p.add_argument_group("data")
    d.add_argument("--langs", default=None, help="comma-separated languages of the embedded corpus "
                   "(default: en,de,fr,es,ru,zh_Hans,ja,ar)")
    d.add_argument("--n", type=int, default=200, help="texts per language for the statistics (default 200)")
    add_corpus_arguments(d)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--max-length", type=int, default=128)
    d.add_argument("--packing", action="store_true", help="LAPE packing: concatenate each language's tokens "
                   "and cut rows of --max-length")
    a = p.add_argument_group("identification")
    a.add_argument("--top-rate", type=float, default=0.01, help="fraction of all neurons selected (LAPE: 0.01)")
    a.add_argument("--bar", type=float, default=0.95, help="activation bar quantile (0.95)")
    a.add_argument("--lam", default="auto", help="lambda of the classification score, or 'auto' (sweep)")
    a.add_argument("--deactivate", action="store_true", help="also compute the K x K deactivation matrix")
    a.add_argument("--eval-n", type=int, default=50, help="held-out texts per language for --deactivate")
    o = p.add_argument_group("output")
    add_out_argument(o, "xlk_neurons")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def split_eval(corpus, eval_n):
    """(stats corpus, held-out eval corpus): the last eval_n texts of each language are held out."""
    stats, ev = {}, {}
    for lang, texts in corpus.items():
        k = min(eval_n, len(texts) // 2)
        stats[lang], ev[lang] = texts[:len(texts) - k], texts[len(texts) - k:]
    return stats, ev


def plot_counts(counts, langs, path, title="language-specific neurons per layer (LAPE)"):
    """Grouped bars: neurons per layer for each language. counts (K, L)."""
    from xlkernels.analysis.plots import neuron_counts
    return neuron_counts({x: c for x, c in zip(langs, counts.tolist())}, path, title=title)


def analyse(steerer, tok, corpus, args, progress=True, log=print, collect=None):
    """Stats -> LAPE -> classification (-> deactivation). Returns (summary dict, tensors dict, stats).
    collect(corpus) -> NeuronStats replaces the HF pass (e.g. inside vLLM); steerer may then be None."""
    from xlkernels.analysis import neurons as N
    langs = list(corpus)
    stats_corpus, eval_corpus = split_eval(corpus, args.eval_n) if args.deactivate else (corpus, None)
    t0 = time.perf_counter()
    if collect is not None:
        stats = collect(stats_corpus)
    else:
        stats = N.collect_stats(steerer, tok, stats_corpus, args.batch_size, args.max_length, progress=progress,
                                packing=args.packing)
    t_stats = time.perf_counter() - t0
    num_layers, num_neurons = stats.positive.shape[0], stats.positive.shape[-1]
    ntok = int(stats.tokens[0].sum())
    log(f"statistics: {ntok} tokens in {t_stats:.1f} s ({ntok / max(t_stats, 1e-9):.0f} tokens/s), "
        f"{num_layers} layers x {num_neurons} neurons x {len(langs)} languages")
    p = N.activation_probs(stats)
    lape = N.lape(p, top_rate=args.top_rate, activation_bar_ratio=args.bar)
    lam = args.lam if args.lam == "auto" else float(args.lam)
    cls = N.classify(p, lam=lam, top_rate=args.top_rate, activation_bar_ratio=args.bar)
    lape_counts = lape.counts()
    cc = cls.counts()
    summary = {
        "languages": langs, "num_layers": num_layers, "num_neurons": num_neurons,
        "tokens": dict(zip(langs, stats.tokens[0].tolist())), "seconds_stats": round(t_stats, 2),
        "lape": {"top_rate": args.top_rate, "filter_value": lape.filter_value, "bar": lape.bar,
                 "selected": int(lape.selected.sum()),
                 "per_language": dict(zip(langs, lape_counts.sum(1).tolist())),
                 "per_language_layer": {x: c for x, c in zip(langs, lape_counts.tolist())}},
        "classes": {"lambda": cls.lam, "lambda_auto": args.lam == "auto", "thr": cls.thr, "appear": cls.appear,
                    "specific": dict(zip(langs, cc["specific"].sum(1).tolist())),
                    "related": dict(zip(langs, cc["related"].sum(1).tolist())),
                    "general": int(cc["general"].sum()),
                    "general_per_layer": cc["general"].tolist(),
                    "sweep": [[lam_, a] for lam_, a in cls.history]},
    }
    tensors = {}
    tensors.update(N.neuron_sets_tensors("lape", lape.neurons, langs))
    tensors.update(N.neuron_sets_tensors("specific", cls.specific, langs))
    tensors.update(N.neuron_sets_tensors("related", cls.related, langs))
    tensors.update(N.neuron_sets_tensors("general", [cls.general], ["all"]))
    tensors["lape_counts"] = lape_counts.contiguous()
    if args.deactivate:
        from xlkernels.analysis.neurons.deactivation import deactivation_matrix, format_matrix
        t0 = time.perf_counter()
        res = deactivation_matrix(steerer, tok, eval_corpus, lape.neurons, batch_size=args.batch_size,
                                  max_length=args.max_length, progress=progress)
        summary["deactivation"] = {"langs_off": res["langs_off"], "langs_eval": res["langs_eval"],
                                   "base_nll": res["base"].tolist(), "nll": res["loss"].tolist(),
                                   "delta": res["delta"].tolist(), "seconds": round(time.perf_counter() - t0, 2)}
        tensors["deactivation_delta"] = res["delta"].float().contiguous()
        summary["_matrix_text"] = format_matrix(res)
    return summary, tensors, stats, lape, cls


def write_outputs(out, summary, tensors, stats, lape_counts, langs):
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    stats.save(os.path.join(out, "stats.safetensors"))
    save_file(tensors, os.path.join(out, "neurons.safetensors"))
    plot_counts(lape_counts, langs, os.path.join(out, "neurons.png"))
    summary = {k: v for k, v in summary.items() if not k.startswith("_")}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def format_summary(summary) -> str:
    langs = summary["languages"]
    lp, cl = summary["lape"], summary["classes"]
    lines = [f"{'lang':<8}{'tokens':>8}{'LAPE':>7}{'specific':>10}{'related':>9}"]
    for x in langs:
        lines.append(f"{x:<8}{summary['tokens'][x]:>8}{lp['per_language'][x]:>7}{cl['specific'][x]:>10}"
                     f"{cl['related'][x]:>9}")
    lines.append(f"LAPE: {lp['selected']} neurons selected (top {lp['top_rate']:.2%}), bar p > {lp['bar']:.3f}")
    lines.append(f"classes: lambda = {cl['lambda']:.6f}{' (auto-sweep)' if cl['lambda_auto'] else ''}, "
                 f"appear = {cl['appear']}, general neurons (active in all languages) = {cl['general']}")
    return "\n".join(lines)


def run_vllm(args, progress):
    """The statistics inside vLLM; LAPE and the classes as on the HF path."""
    if args.tiny:
        raise ValueError("--engine vllm needs a model directory (--model) or the embedded model, not --tiny")
    if args.deactivate:
        raise ValueError("--deactivate runs on the HF engine only; drop --engine vllm or --deactivate")
    from transformers import AutoTokenizer

    from xlkernels.models import DEFAULT_NAME
    try:
        from xlkernels.vllm import LLM, collect_stats
    except ImportError as e:   # no vLLM in this environment: the CLI's one-line error, not a traceback
        raise RuntimeError(str(e)) from None
    path = os.path.expanduser(args.model) if args.model else None
    llm = LLM(path, dtype=args.dtype, max_model_len=max(args.max_length, 64) + 8, kv_cache_memory_bytes=1 << 30)
    tok = AutoTokenizer.from_pretrained(llm.llm_engine.vllm_config.model_config.tokenizer, local_files_only=True)
    name = os.path.basename(os.path.normpath(args.model)) if args.model else DEFAULT_NAME
    corpus = load_corpus(args, args.n)
    print(f"model {name} (vLLM); languages {', '.join(corpus)}; {min(len(t) for t in corpus.values())} texts each",
          file=sys.stderr)
    def collect(c):
        return collect_stats(llm, c, tokenizer=tok, max_length=args.max_length, packing=args.packing,
                             progress=progress)
    return analyse(None, tok, corpus, args, progress, collect=collect), name, corpus


def run(args) -> int:
    import xlkernels
    progress = not args.no_progress
    for name in ("n", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "engine", "hf") == "vllm":
        (summary, tensors, stats, lape, _), name, corpus = run_vllm(args, progress)
        return _finish(args, summary, tensors, stats, lape, name, corpus)
    model, tok, name = load_model_from_args(args, progress)
    n_total = args.n + (args.eval_n if args.deactivate else 0)
    corpus = load_corpus(args, n_total)
    steerer = xlkernels.patch(model)
    print(f"model {name}; languages {', '.join(corpus)}; {min(len(t) for t in corpus.values())} texts each",
          file=sys.stderr)
    summary, tensors, stats, lape, _ = analyse(steerer, tok, corpus, args, progress)
    return _finish(args, summary, tensors, stats, lape, name, corpus)


def _finish(args, summary, tensors, stats, lape, name, corpus) -> int:
    summary["model"] = name
    with staged_dir(args.out) as out:
        write_outputs(out, summary, tensors, stats, lape.counts(), list(corpus))
    print(format_summary(summary))
    if "_matrix_text" in summary:
        print("deactivation: change of mean NLL (rows: neurons switched off, columns: evaluated language)")
        print(summary["_matrix_text"])
    print(f"wrote {args.out}/summary.json, stats.safetensors, neurons.safetensors, neurons.png")
    return 0
