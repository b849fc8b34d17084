"""LAHIS head-importance scan: xlkernels (patched model, fused steered attention, batched per-sample gate
gradients) vs the original code's approach (eager attention, o_proj pre-hook mask, one text per forward+backward).

Providers (same model, same texts, same run):
  xlk        xlkernels.patch(model); lahis_scores(mode, batch_size=B): one forward+backward per B texts
  xlk_bs1    the same with batch_size=1 (separates batching from the kernel)
  hooks      attn_implementation="eager", forward pre-hook on every o_proj multiplying a mask Parameter,
             model(x, labels=x).loss per text (xlkernels.analysis.heads.lahis_scores_hooked)
Modes: "gradient" (gate gradient at 1) and, unless --quick, "paper" (AdamW step on the mask after each text;
batch size 1 by definition, so xlk runs it per text too).
Rows: ms for the whole scan of N texts, texts/s, peak extra memory (MB), and `max_rel_diff` of the scores
against the hooks provider (a correctness check carried with the timing).
Models: a Llama-shaped random model (CPU small; GPU Llama-8B-shaped layers, a few of them) with a byte-level
tokenizer, and with --model default|all the embedded Gemma-3-270M. Texts: the embedded parallel corpus
(English), joined to about --tokens tokens each.

python -m bench.bench_lahis [--quick] [--device cpu|cuda] [--model llama|default|all] [--n N] [--tokens T]
"""
import argparse
import statistics

import torch

from bench import common


def llama(device, dtype, quick):
    cpu = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=704, vocab_size=512)
    model, label = common.llama_model(device, dtype, quick, cpu, attn_implementation="eager")
    from xlkernels.models import tiny_tokenizer
    return model, tiny_tokenizer(), label


def default_model(device, dtype, quick):
    from xlkernels.models import load_default

    model, tok = load_default(dtype=dtype, device=device, progress=False)
    return model.eval(), tok, "gemma-3-270m"


def make_texts(tok, n, tokens):
    """n English texts of about `tokens` tokens each, joined from the parallel corpus."""
    from xlkernels.analysis.data import parallel_corpus

    msgs = parallel_corpus(["en"])["en"]
    out, i = [], 0
    for _ in range(n):
        parts = []
        while len(tok(" ".join(parts))["input_ids"]) < tokens:
            parts.append(msgs[i % len(msgs)])
            i += 1
        out.append(" ".join(parts))
    return out


def _quantiles(ms):
    xs = sorted(ms)
    q = lambda f: xs[min(len(xs) - 1, max(0, round(f * (len(xs) - 1))))]  # noqa: E731
    return {"p50": statistics.median(xs), "p20": q(0.2), "p80": q(0.8)}


def run_model(model, tok, name, device, args, rows):
    """Providers are timed in interleaved rounds (one call each per round) so load changes on a shared
    machine hit all of them alike; memory is measured in a separate call."""
    import xlkernels
    from xlkernels.analysis import heads, tokens

    texts = make_texts(tok, args.n, args.tokens)
    ml = args.tokens + 64
    ntok = sum(len(s) for s in tokens.encode(tok, texts, ml))
    shape = {"model": name, "N": args.n, "tokens": ntok, "B": args.batch_size,
             "dtype": str(args.dtype).replace("torch.", "")}
    modes = ("gradient",) if args.quick else ("gradient", "paper")
    rounds = args.rounds or (3 if device.type == "cpu" else 5)

    def hooks(mode):
        xlkernels.unpatch(model)
        model.set_attn_implementation("eager")
        return heads.lahis_scores_hooked(model, tok, texts, mode=mode, max_length=ml, mask_dtype=torch.float32)

    def xlk(mode, bs):
        st = xlkernels.patch(model)
        return heads.lahis_scores(st, tok, texts, mode=mode, batch_size=bs, max_length=ml,
                                  mask_dtype=torch.float32)

    for mode in modes:
        provs = {"hooks": lambda: hooks(mode), "xlk": lambda: xlk(mode, args.batch_size if mode == "gradient" else 1)}
        if mode == "gradient" and not args.quick:
            provs["xlk_bs1"] = lambda: xlk(mode, 1)
        res = {k: fn() for k, fn in provs.items()}             # warm-up (and the scores compared below)
        times = {k: [] for k in provs}
        for _ in range(rounds):
            for k, fn in provs.items():
                times[k].append(common.timeit(fn, warmup=0, rep=1, device=device, flush_l2=False)["p50"])
        ref = res["hooks"]
        for k, fn in provs.items():
            t = _quantiles(times[k])
            mem = common.memory(fn, device)
            diff = float((res[k] - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            extra = {"max_rel_diff": diff, "rounds": rounds}
            rows.append(common.row("lahis", k, mode, shape, "ms", t, **extra))
            rows.append(common.row("lahis", k, mode, shape, "texts/s", common.rate(t, args.n, 1.0), **extra))
            if mem is not None:
                rows.append(common.row("lahis", k, mode, shape, "MB", {"p50": mem}, **extra))
            print(f"{mode:<9}{k:<9}{t['p50']:>10.1f} ms [{t['p20']:.0f}, {t['p80']:.0f}]  "
                  f"{args.n / (t['p50'] / 1e3):>8.2f} texts/s  peak {mem if mem is None else round(mem)} MB  "
                  f"max rel diff {diff:.1e}", flush=True)
    xlkernels.unpatch(model)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_lahis", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--model", choices=("llama", "default", "all"), default="llama")
    p.add_argument("--n", type=int, default=None, help="texts (default: CPU 8, GPU 64; quick 4)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per text (default: CPU 64, GPU 512)")
    p.add_argument("--batch-size", type=int, default=None, help="xlk batch size (default: CPU 8, GPU 16)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: CPU 3, GPU 5)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: CPU float32, GPU bfloat16)")
    args = p.parse_args(argv)
    device = torch.device(args.device) if args.device else common.default_device()
    gpu = device.type == "cuda"
    args.n = args.n or (4 if args.quick else (64 if gpu else 8))
    args.tokens = args.tokens or (512 if gpu else 64)
    args.batch_size = args.batch_size or (16 if gpu else 8)
    args.dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    rows = []
    if args.model in ("llama", "all"):
        model, tok, name = llama(device, args.dtype, args.quick)
        run_model(model, tok, name, device, args, rows)
        del model
    if args.model in ("default", "all"):
        model, tok, name = default_model(device, args.dtype, args.quick)
        run_model(model, tok, name, device, args, rows)
    name = f"lahis-{args.model}" + ("-quick" if args.quick else "")
    note = "whole-scan times, providers interleaved per round; CPU runs on a shared, loaded 2-core machine"
    path = common.record(rows, name, meta={"note": note})
    for r in common.ratio(rows, "hooks"):
        if r["metric"] == "ms" and r["provider"] != "hooks":
            print(f"{r['mode']:<9}{r['provider']:<9} vs hooks: {r['speedup']:.2f}x  "
                  f"(max rel diff {r.get('max_rel_diff', float('nan')):.1e})  {common.shape_key(r['shape'])}")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
