"""neuron_stats and glu-with-stats vs plain PyTorch (index_add_ over groups) and vs separate glu + stats.

python -m bench.bench_neuron_stats [--quick] [--device cpu|cuda] [--dtype float32 bfloat16 ...] [--threads N]
Rows (ms and GB/s of minimal traffic: stats reads act; glu reads gate+up and writes out):
  neuron_stats: xlkernels (default backend), triton (GPU), torch (index_add_/scatter_reduce formulation)
  glu_stats:    xlkernels fused, xlkernels glu + xlkernels neuron_stats (separate), torch (silu*up + torch stats)
  glu:          xlkernels glu alone and torch silu(gate)*up, the reference for "fused <= 5% slower than glu alone"
plus the device copy bandwidth of the same run (op "copy") as the ceiling.
"""
import argparse
import sys

import torch

import xlkernels
from bench import common

SHAPES = {"cpu": [(2048, 2048, 8), (4096, 2048, 16)], "cuda": [(16384, 8192, 8), (8192, 14336, 32)]}
QUICK = {"cpu": [(1024, 1024, 8)], "cuda": [(4096, 8192, 8)]}


def make_ids(n, groups, seq=128, device="cpu"):
    """Per-sequence language ids with a few left-padding (-1) tokens per sequence."""
    ids = torch.randint(0, groups, (n // seq + 1,)).repeat_interleave(seq)[:n]
    ids[torch.arange(n) % seq < 8] = -1
    return ids.to(device)


def torch_stats(act, ids, stats):
    """Best plain-PyTorch formulation: padding mapped to an extra scratch group, index_add_ in float64."""
    groups = stats.num_groups
    idx = torch.where(ids >= 0, ids, groups)
    x = act.double()
    nn = act.shape[1]
    pos = torch.zeros(groups + 1, nn, dtype=torch.int64, device=act.device).index_add_(0, idx, (act > 0).long())
    s = torch.zeros(groups + 1, nn, dtype=torch.float64, device=act.device).index_add_(0, idx, x)
    q = torch.zeros(groups + 1, nn, dtype=torch.float64, device=act.device).index_add_(0, idx, x * x)
    m = torch.full((groups + 1, nn), float("-inf"), device=act.device).scatter_reduce_(
        0, idx[:, None].expand(-1, nn), act.float(), "amax")
    stats.tokens += torch.bincount(idx, minlength=groups + 1)[:groups]
    stats.positive += pos[:groups]
    stats.sum += s[:groups]
    stats.sum_sq += q[:groups]
    torch.maximum(stats.max, m[:groups], out=stats.max)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_neuron_stats", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=str(common.default_device()))
    p.add_argument("--dtype", nargs="+", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtypes = args.dtype or (["float32", "bfloat16"] if dev.type == "cpu" else ["bfloat16", "float32"])
    shapes = (QUICK if args.quick else SHAPES)[dev.type]
    rep, warmup = (5, 2) if args.quick else ((10, 2) if dev.type == "cpu" else (20, 3))
    rows = []
    bw = common.copy_bandwidth(dev, nbytes=2**26 if args.quick and dev.type == "cpu" else None)
    rows.append(common.row("copy", "torch", "copy", "clone", "GB/s", bw))
    print(f"copy bandwidth {bw['p50']:.1f} GB/s")
    silu = torch.nn.functional.silu
    for dt_name in dtypes:
        dtype = getattr(torch, dt_name)
        for n, nn, groups in shapes:
            shape = {"N": n, "I": nn, "G": groups, "dtype": dt_name}
            act = torch.randn(n, nn, device=dev).to(dtype)
            gate = torch.randn(n, nn, device=dev).to(dtype)
            up = torch.randn(n, nn, device=dev).to(dtype)
            ids = make_ids(n, groups, device=dev)
            esz = act.element_size()
            stats = xlkernels.NeuronStats.empty(groups, nn, device=dev)

            def add(op, prov, fn, nbytes):
                with torch.no_grad():
                    t = common.timeit(fn, warmup=warmup, rep=rep, device=dev)
                rows.append(common.row(op, prov, "forward", shape, "ms", t))
                rows.append(common.row(op, prov, "forward", shape, "GB/s", common.rate(t, nbytes),
                                       frac_copy_bw=common.rate(t, nbytes)["p50"] / bw["p50"]))
                return t["p50"]

            ms = {}
            nb = n * nn * esz
            ms["stats/xlk"] = add("neuron_stats", "xlkernels", lambda: xlkernels.neuron_stats(act, ids, groups, stats), nb)
            if dev.type == "cuda":
                def tri():
                    with xlkernels.backend("triton"):
                        xlkernels.neuron_stats(act, ids, groups, stats)
                ms["stats/triton"] = add("neuron_stats", "triton", tri, nb)
            ms["stats/torch"] = add("neuron_stats", "torch", lambda: torch_stats(act, ids, stats), nb)

            nb = 3 * n * nn * esz
            ms["glu_stats/fused"] = add("glu_stats", "xlkernels", lambda: xlkernels.glu(
                gate, up, stats=stats, group_ids=ids), nb)

            def separate():
                a = silu(gate)
                out = a * up
                xlkernels.neuron_stats(a, ids, groups, stats)
                return out

            def torch_sep():
                a = silu(gate)
                out = a * up
                torch_stats(a, ids, stats)
                return out
            ms["glu_stats/separate"] = add("glu_stats", "xlkernels-separate", separate, nb)
            ms["glu_stats/torch"] = add("glu_stats", "torch", torch_sep, nb)
            ms["glu/xlk"] = add("glu", "xlkernels", lambda: xlkernels.glu(gate, up), nb)
            ms["glu/torch"] = add("glu", "torch", lambda: silu(gate) * up, nb)
            print(f"{dt_name} N{n} I{nn} G{groups}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()) +
                  f" | stats speedup vs torch {ms['stats/torch'] / ms['stats/xlk']:.1f}x,"
                  f" fused glu+stats / glu alone {ms['glu_stats/fused'] / ms['glu/xlk']:.2f}", flush=True)
    path = common.record(rows, args.name or "neuron_stats" + ("-quick" if args.quick else ""))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
