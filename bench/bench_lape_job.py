"""The whole LAPE job on the embedded Gemma-3-270M: statistics + selection + the K x K deactivation matrix,
xlkernels vs a naive batch-of-one hook pipeline on the same data, in the same process.

  xlk    xlkernels.patch(model); collect_stats (fused GLU counters, length-bucketed batches, logits of one
         position) -> activation_probs -> lape -> deactivation_matrix (fused GLU zeroing, length-bucketed
         batches, chunked LM-head NLL on the predicted positions only); unpatch.
  naive  the unpatched HF model, one text per forward: forward hooks on every mlp.act_fn counting act > 0
         per language (logits of the last position only, as LAPE's vLLM run with max_tokens=1); the same
         lape selection; deactivation by act_fn forward hooks (index_fill_ 0), full logits + cross-entropy per
         text (as LAPE's ppl.py with prompt_logprobs).

Data: the embedded parallel corpus, --langs, the first --n aligned messages; every --eval-every-th message
is held out for the matrix, the rest feed the statistics. Timing: torch.set_num_threads(1), process CPU
time per stage, pipelines interleaved (the order alternates per round), medians over --rounds. Checks: the
selected neurons and the matrices of both pipelines are compared and stored with the times.

--with-old adds "old": the library before length batching (collect_stats bucket=False, language_nll on
batch_size texts in corpus order with full logits), for the before/after ratio.

python -m bench.bench_lape_job [--n 250] [--rounds 3] [--langs en,de,fr,es,ru] [--with-old] [--tag TAG]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench import common

STAGES = ("stats", "select", "matrix")


# ---------------------------------------------------------------------------------------------- naive
def naive_stats(model, tok, corpus, max_length):
    """(over_zero (L, I, K) long, tokens (K,) long): act_fn forward hooks, one text per forward."""
    layers = model.model.layers
    L, I, K = len(layers), model.config.intermediate_size, len(corpus)
    over = torch.zeros(L, I, K, dtype=torch.long)
    cur = {"k": 0}

    def hook(l):
        def fn(mod, inp, out):
            over[l, :, cur["k"]] += (out.reshape(-1, out.shape[-1]) > 0).sum(0)
        return fn

    hs = [layer.mlp.act_fn.register_forward_hook(hook(l)) for l, layer in enumerate(layers)]
    tokens = torch.zeros(K, dtype=torch.long)
    try:
        with torch.no_grad():
            for k, texts in enumerate(corpus.values()):
                cur["k"] = k
                for t in texts:
                    ids = torch.tensor([tok(t, truncation=True, max_length=max_length)["input_ids"]])
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
                    tokens[k] += ids.shape[1]
    finally:
        for h in hs:
            h.remove()
    return over, tokens


def naive_nll(model, tok, corpus, max_length):
    out = []
    with torch.no_grad():
        for texts in corpus.values():
            tot, cnt = 0.0, 0
            for t in texts:
                ids = torch.tensor([tok(t, truncation=True, max_length=max_length)["input_ids"]])
                if ids.shape[1] < 2:
                    continue
                logits = model(input_ids=ids, use_cache=False).logits
                tot += F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").double().item()
                cnt += ids.shape[1] - 1
            out.append(tot / cnt)
    return torch.tensor(out, dtype=torch.float64)


def naive_matrix(model, tok, corpus, neurons, max_length):
    layers = model.model.layers
    base = naive_nll(model, tok, corpus, max_length)
    rows = []
    for per_l in neurons:
        hs = [layers[l].mlp.act_fn.register_forward_hook(lambda m, i, o, idx=idx: o.index_fill_(-1, idx, 0))
              for l, idx in enumerate(per_l) if idx.numel()]
        try:
            rows.append(naive_nll(model, tok, corpus, max_length))
        finally:
            for h in hs:
                h.remove()
    loss = torch.stack(rows)
    return {"base": base, "loss": loss, "delta": loss - base}


def run_naive(model, tok, stats_corpus, eval_corpus, args, times):
    from xlkernels.analysis import neurons as N
    t = time.process_time()
    over, tokens = naive_stats(model, tok, stats_corpus, args.max_length)
    times["stats"].append(time.process_time() - t)
    t = time.process_time()
    p = over.double() / tokens.double().clamp_min(1)
    sel = N.lape(p)
    times["select"].append(time.process_time() - t)
    t = time.process_time()
    res = naive_matrix(model, tok, eval_corpus, sel.neurons, args.max_length)
    times["matrix"].append(time.process_time() - t)
    return over, sel, res


# ---------------------------------------------------------------------------------------------- xlkernels
def run_xlk(model, tok, stats_corpus, eval_corpus, args, times):
    import xlkernels
    from xlkernels.analysis import neurons as N
    from xlkernels.analysis.neurons.deactivation import deactivation_matrix
    t = time.process_time()
    st = xlkernels.patch(model)
    try:
        stats = N.collect_stats(st, tok, stats_corpus, batch_size=args.batch_size, max_length=args.max_length,
                                progress=False)
        times["stats"].append(time.process_time() - t)
        t = time.process_time()
        sel = N.lape(N.activation_probs(stats))
        times["select"].append(time.process_time() - t)
        t = time.process_time()
        res = deactivation_matrix(st, tok, eval_corpus, sel.neurons, batch_size=args.batch_size,
                                  max_length=args.max_length, progress=False)
    finally:
        xlkernels.unpatch(model)
    times["matrix"].append(time.process_time() - t)
    return stats.positive.permute(0, 2, 1).long(), sel, res


# ---------------------------------------------------------------------------------------------- before
def old_nll(model, tok, corpus, batch_size, max_length):
    """language_nll as it was before length batching: batch_size texts in interleaved corpus order, right
    padding, full (B, T, V) logits, cross-entropy row by row."""
    from xlkernels.analysis.neurons.stats import text_batches
    K = len(corpus)
    total = torch.zeros(K, dtype=torch.float64)
    count = torch.zeros(K, dtype=torch.float64)
    with torch.no_grad():
        for ids, mask, groups in text_batches(tok, corpus, batch_size, max_length):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for b in range(ids.shape[0]):
                nll = F.cross_entropy(logits[b, :-1].float(), ids[b, 1:], reduction="none").double()
                g = groups[b, 1:]
                total.index_add_(0, g.clamp_min(0), nll * (g >= 0))
                count.index_add_(0, g.clamp_min(0), (g >= 0).double())
    return total / count


def run_old(model, tok, stats_corpus, eval_corpus, args, times):
    """The library before this change (corpus-order padded batches, full logits) on the same data."""
    import xlkernels
    from xlkernels.analysis import neurons as N
    from xlkernels.analysis.neurons.deactivation import _clear
    t = time.process_time()
    st = xlkernels.patch(model)
    try:
        stats = N.collect_stats(st, tok, stats_corpus, batch_size=args.batch_size, max_length=args.max_length,
                                progress=False, bucket=False)
        times["stats"].append(time.process_time() - t)
        t = time.process_time()
        sel = N.lape(N.activation_probs(stats))
        times["select"].append(time.process_time() - t)
        t = time.process_time()
        _clear(st)
        base = old_nll(model, tok, eval_corpus, args.batch_size, args.max_length)
        rows = []
        for per_l in sel.neurons:
            _clear(st)
            st.deactivate_neurons(N.as_layer_dict(per_l))
            rows.append(old_nll(model, tok, eval_corpus, args.batch_size, args.max_length))
        _clear(st)
    finally:
        xlkernels.unpatch(model)
    times["matrix"].append(time.process_time() - t)
    loss = torch.stack(rows)
    return stats.positive.permute(0, 2, 1).long(), sel, {"base": base, "loss": loss, "delta": loss - base}


# ---------------------------------------------------------------------------------------------- main
def split(corpus, every):
    stats = {k: [t for i, t in enumerate(v) if i % every != every - 1] for k, v in corpus.items()}
    ev = {k: [t for i, t in enumerate(v) if i % every == every - 1] for k, v in corpus.items()}
    return stats, ev


def _med(xs):
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_lape_job", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=250, help="aligned messages per language (default 250)")
    p.add_argument("--eval-every", type=int, default=5, help="every k-th message is held out for the matrix")
    p.add_argument("--langs", default="en,de,fr,es,ru")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="xlk batch_size (the CLI default)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--join", type=int, default=1, help="join k consecutive messages into one text (paragraphs)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--with-old", action="store_true", help="also time the library before length batching "
                   "(corpus-order padded batches, full logits)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.commit_at_start = common._git("rev-parse", "HEAD")   # other sessions may commit during a long run
    from xlkernels.analysis.data import parallel_corpus
    from xlkernels.models import load_default
    model, tok = load_default(progress=False)
    model.eval()
    corpus = parallel_corpus(args.langs.split(","), n=args.n)
    corpus = {k: [" ".join(v[i:i + args.join]) for i in range(0, len(v), args.join)] for k, v in corpus.items()}
    stats_corpus, eval_corpus = split(corpus, args.eval_every)
    count = lambda c: sum(len(tok(t, truncation=True, max_length=args.max_length)["input_ids"])  # noqa: E731
                          for v in c.values() for t in v)
    settings = {"model": "gemma-3-270m (fp32)", "langs": list(corpus), "n_per_lang": args.n, "join": args.join,
                "stats_texts": sum(map(len, stats_corpus.values())), "eval_texts": sum(map(len, eval_corpus.values())),
                "stats_tokens": count(stats_corpus), "eval_tokens": count(eval_corpus), "eval_every": args.eval_every,
                "max_length": args.max_length, "xlk_batch_size": args.batch_size, "threads": 1,
                "clock": "process CPU time (time.process_time)", "rounds": args.rounds}
    print(json.dumps(settings), flush=True)
    names = ("naive", "xlk") + (("old",) if args.with_old else ())
    runners = {"naive": run_naive, "xlk": run_xlk, "old": run_old}
    times = {name: {s: [] for s in STAGES} for name in names}
    uptimes = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    out = {}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            out[name] = runners[name](model, tok, stats_corpus, eval_corpus, args, times[name])
            tot = sum(times[name][s][-1] for s in STAGES)
            print(f"round {r} {name:<6} " + " ".join(f"{s} {times[name][s][-1]:8.1f} s" for s in STAGES)
                  + f"  total {tot:8.1f} s", flush=True)
        uptimes.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        path, summary = write(args, corpus, settings, uptimes, times, out, r + 1)   # after every round
    print(json.dumps(summary, indent=1))
    print(path)
    return 0


def write(args, corpus, settings, uptimes, times, out, rounds):
    """Checks (last run of each pipeline) and medians over the rounds so far -> the result file."""
    (over_n, sel_n, res_n), (over_x, sel_x, res_x) = out["naive"], out["xlk"]
    same_neurons = all(torch.equal(a, b) for la, lb in zip(sel_n.neurons, sel_x.neurons) for a, b in zip(la, lb))
    checks = {
        "same_selected_neurons": same_neurons,
        "selected": int(sel_x.selected.sum()),
        "assigned_per_language": dict(zip(corpus, sel_x.counts().sum(1).tolist())),
        "over_zero_max_abs_diff": int((over_n - over_x).abs().max()),
        "over_zero_entries_differing": int((over_n != over_x).sum()),
        "matrix_loss_max_abs_diff": float((res_n["loss"] - res_x["loss"]).abs().max()),
        "matrix_base_max_abs_diff": float((res_n["base"] - res_x["base"]).abs().max()),
        "matrix_delta_max_abs_diff": float((res_n["delta"] - res_x["delta"]).abs().max()),
        "matrix_loss_max_rel_diff": float(((res_n["loss"] - res_x["loss"]).abs() / res_n["loss"].abs()).max()),
        "delta_xlk": res_x["delta"].tolist(), "base_xlk": res_x["base"].tolist(),
    }
    med = {name: {s: _med(times[name][s]) for s in STAGES} for name in times}
    for name in med:
        med[name]["total"] = _med([sum(times[name][s][i] for s in STAGES) for i in range(rounds)])
    ratio = {s: med["naive"][s] / med["xlk"][s] if med["xlk"][s] else None for s in (*STAGES, "total")}
    if "old" in med:
        ratio_old = {s: med["naive"][s] / med["old"][s] if med["old"][s] else None for s in (*STAGES, "total")}
        (_, sel_o, res_o) = out["old"]
        checks["old_same_selected_neurons"] = all(torch.equal(a, b) for la, lb in zip(sel_o.neurons, sel_x.neurons)
                                                  for a, b in zip(la, lb))
        checks["old_matrix_loss_max_abs_diff"] = float((res_o["loss"] - res_x["loss"]).abs().max())
    else:
        ratio_old = None
    info = common.device_info(torch.device("cpu"))
    info["commit_full"] = common._git("rev-parse", "HEAD")
    info["commit_at_start"] = args.commit_at_start
    result = {"meta": info, "settings": {**settings, "rounds_done": rounds}, "uptime": uptimes, "times_s": times,
              "median_s": med, "speedup_naive_over_xlk": ratio, "speedup_naive_over_old": ratio_old,
              "target_total": 2.0, "checks": checks}
    slug = common.device_slug(info)
    name = f"lape_job-{slug}-{info['date'][:10]}" + (f"-{args.tag}" if args.tag else "") + ".json"
    path = os.path.join(common.RESULTS, name)
    with open(path, "w") as f:
        json.dump(common._clean(result), f, indent=1)
    summary = {"median_s": med, "speedup": ratio, "speedup_old": ratio_old,
               "checks": {k: v for k, v in checks.items() if not k.endswith("_xlk")}}
    return path, summary


if __name__ == "__main__":
    sys.exit(main())
