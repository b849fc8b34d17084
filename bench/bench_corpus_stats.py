"""Corpus statistics throughput (tokens/s): a plain forward of the patched model, the same forward recording
per-language neuron statistics (fused in xlkernels.glu), and the hook way (forward hook on every mlp.act_fn
counting act > 0 per language with index_add_, as a LAPE port to HF would) on the unpatched model.

python -m bench.bench_corpus_stats [--quick] [--device cpu|cuda] [--model default|tiny] [--threads N]
"""
import argparse
import os
import sys

import torch

from bench import common

# (batch, seq) per device; the model is a mid-size random llama unless --model default (Gemma-3-270M)
SHAPES = {"cpu": [(8, 128)], "cuda": [(32, 512)]}
QUICK = {"cpu": [(4, 64)], "cuda": [(8, 256)]}
MID = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=4, head_dim=64, max_position_embeddings=1024)


def hook_counter(model, num_groups):
    """Forward hooks on mlp.act_fn: per layer (G, I) counts of act > 0 and token counts; returns (state, handles)."""
    layers = model.model.layers
    state = {"ids": None, "pos": [None] * len(layers), "tok": None}

    def make(i):
        def fn(mod, inp, out):
            a = out.detach().reshape(-1, out.shape[-1])
            ids = state["ids"]
            idx = torch.where(ids >= 0, ids, num_groups)
            c = torch.zeros(num_groups + 1, a.shape[-1], dtype=torch.long, device=a.device)
            c.index_add_(0, idx, (a > 0).long())
            state["pos"][i] = c[:num_groups] if state["pos"][i] is None else state["pos"][i] + c[:num_groups]
        return fn

    return state, [l.mlp.act_fn.register_forward_hook(make(i)) for i, l in enumerate(layers)]


def round_robin(cases, warmup, rep):
    """CPU timing on a shared machine: one call of each provider per round, so load changes hit all alike."""
    import time
    for _, fn in cases:
        for _ in range(warmup):
            fn()
    times = {prov: [] for prov, _ in cases}
    for _ in range(rep):
        for prov, fn in cases:
            t0 = time.perf_counter()
            fn()
            times[prov].append((time.perf_counter() - t0) * 1e3)
    return {prov: common._quantiles(ts) for prov, ts in times.items()}


def main(argv=None) -> int:
    import xlkernels
    from xlkernels.models import load_default, tiny_model
    p = argparse.ArgumentParser(prog="python -m bench.bench_corpus_stats", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=str(common.default_device()))
    p.add_argument("--model", default="mid", choices=("mid", "default"),
                   help="mid: random llama (hidden 512, I 2048, 4 layers); default: embedded Gemma-3-270M")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--name", default="corpus_stats")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if dev.type == "cpu" else "bfloat16"))
    rep, warmup = (3, 1) if args.quick else (10, 2)
    shapes = (QUICK if args.quick else SHAPES)[dev.type]
    rows = []
    for model_kind in [args.model]:
        if model_kind == "default":
            plain, _ = load_default(dtype=dtype, device=dev, progress=False)
            patched, _ = load_default(dtype=dtype, device=dev, progress=False)
        else:
            plain, _ = tiny_model("llama", dtype=dtype, **MID)
            patched, _ = tiny_model("llama", dtype=dtype, **MID)
            plain, patched = plain.to(dev), patched.to(dev)
        vocab = plain.config.vocab_size
        steerer = xlkernels.patch(patched)
        G = args.groups
        for B, T in shapes:
            ids = torch.randint(4, min(vocab, 32000), (B, T), device=dev)
            groups = torch.arange(B, device=dev).remainder(G)[:, None].expand(B, T).contiguous()
            groups[:, -T // 8:] = -1   # some padding
            mask = (groups >= 0).long()
            shape = {"model": model_kind, "B": B, "T": T, "G": G, "dtype": str(dtype).replace("torch.", ""),
                     "L": steerer.num_layers, "I": steerer.num_neurons}
            kw = dict(attention_mask=mask, use_cache=False, logits_to_keep=1)

            def plain_fwd():
                with torch.no_grad():
                    plain(input_ids=ids, **kw)

            def patched_fwd():
                with torch.no_grad():
                    patched(input_ids=ids, **kw)

            def record_fwd():
                with torch.no_grad(), steerer.record_neurons(groups, G):
                    patched(input_ids=ids, **kw)

            def hook_fwd():
                state, handles = hook_counter(plain, G)
                state["ids"] = groups.reshape(-1)
                try:
                    with torch.no_grad():
                        plain(input_ids=ids, **kw)
                finally:
                    for h in handles:
                        h.remove()

            ntok = int(mask.sum())
            cases = [("hf_plain", plain_fwd), ("xlkernels_plain", patched_fwd),
                     ("xlkernels_record", record_fwd), ("hf_hook_record", hook_fwd)]
            if dev.type == "cuda":
                timings = {prov: common.timeit(fn, warmup=warmup, rep=rep, device=dev) for prov, fn in cases}
            else:
                timings = round_robin(cases, warmup, rep)
            for prov, _ in cases:
                t = timings[prov]
                tps = common.rate(t, ntok, 1.0)
                for metric, vals in (("ms", t), ("tokens/s", tps)):
                    rows.append({"op": "corpus_stats", "provider": prov, "mode": "forward", "shape": shape,
                                 "metric": metric, **vals})
                print(f"{model_kind} B={B} T={T} {prov:<18} {t['p50']:9.2f} ms  {tps['p50']:10.0f} tokens/s",
                      flush=True)
    # the host load at the end of the run: CPU timings taken on a shared, busy machine are noisy
    path = common.record(rows, args.name, meta={"loadavg_1m": os.getloadavg()[0], "threads": torch.get_num_threads()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
