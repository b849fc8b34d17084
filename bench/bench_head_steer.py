"""head_steer (gate*o + shift per head) vs plain PyTorch `o * gate[:, None] + shift`, forward and backward.

python -m bench.bench_head_steer [--quick] [--device cpu|cuda] [--dtype float32 bfloat16 ...] [--threads N]
Rows: ms per call and effective GB/s (minimal bytes: fwd reads o + writes out; bwd reads dO and o, writes
grad_o; `of_copy` = that GB/s / the copy bandwidth), plus the device copy bandwidth of the same run (op "copy").
"""
import argparse
import sys

import torch

import xlkernels
from bench import common
from xlkernels import backends

SHAPES = [  # (B, T, H, D)
    (1, 2048, 4, 256),   # Gemma-3-270M prefill
    (4, 512, 8, 64),
    (2, 1024, 16, 128),  # 7B-like prefill
    (64, 1, 32, 128),    # decode step
]
QUICK_SHAPES = [(1, 512, 4, 256), (16, 1, 32, 128)]


def torch_steer(o, gate, shift):
    return o * gate.to(o.dtype)[:, None] + shift.to(o.dtype)


def triton_steer(o, gate, shift):
    with xlkernels.backend({"head_steer": "triton"}):
        return xlkernels.head_steer(o, gate, shift)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_head_steer", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=str(common.default_device()))
    p.add_argument("--dtype", nargs="+", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="CPU timer (cpu: process time)")
    p.add_argument("--name", default=None, help="result file name (default head_steer[-quick])")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtypes = args.dtype or (["float32", "bfloat16"] if dev.type == "cpu" else ["bfloat16", "float16"])
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rep, warmup = (5, 2) if args.quick else (30, 5)
    rows = []
    clk = {"clock": args.clock} if dev.type == "cpu" else {}
    bw = common.copy_bandwidth(dev, nbytes=2**26 if args.quick and dev.type == "cpu" else None, **clk)
    rows.append(common.row("copy", "torch", "copy", "clone", "GB/s", bw))
    print(f"copy bandwidth {bw['p50']:.1f} GB/s")
    for dt_name in dtypes:
        dtype = getattr(torch, dt_name)
        for B, T, H, D in shapes:
            shape = {"B": B, "T": T, "H": H, "D": D, "dtype": dt_name, "layout": "bhtd-view"}
            # attention output layout: (B,T,H,D) view of (B,H,T,D) memory; params fp32 like the steerer's
            o = torch.randn(B, H, T, D, device=dev).to(dtype).transpose(1, 2)
            gate = torch.rand(H, device=dev) + 0.5
            shift = torch.randn(H, D, device=dev) * 0.1
            dout = torch.randn(B, T, H, D, device=dev).to(dtype)
            n = o.numel() * o.element_size()
            impls = {"xlkernels": xlkernels.head_steer,
                     # plain PyTorch must also make the result (B,T,H,D)-contiguous, as the op does
                     "torch": lambda o, g, s: torch_steer(o, g, s).contiguous()}
            if dev.type == "cuda" and backends.why_not("head_steer", "triton", dev) is None:
                impls["xlkernels-triton"] = triton_steer
            for prov, fn in impls.items():
                with torch.no_grad():
                    t = common.timeit(lambda: fn(o, gate, shift), warmup=warmup, rep=rep, device=dev, **clk)
                rows.append(common.row("head_steer", prov, "forward", shape, "ms", t))
                rows.append(common.row("head_steer", prov, "forward", shape, "GB/s", common.rate(t, 2 * n),
                                       of_copy=common.rate(t, 2 * n)["p50"] / bw["p50"]))
                leaves = [x.detach().clone().requires_grad_() for x in (o, gate, shift)]
                out = fn(*leaves)
                # autograd.grad: the op's backward without AccumulateGrad copies into the leaves
                bwd = lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)  # noqa: E731
                t = common.timeit(bwd, warmup=warmup, rep=rep, device=dev, **clk)
                rows.append(common.row("head_steer", prov, "backward", shape, "ms", t))
                rows.append(common.row("head_steer", prov, "backward", shape, "GB/s", common.rate(t, 3 * n),
                                       of_copy=common.rate(t, 3 * n)["p50"] / bw["p50"]))
                del out, leaves
            ms = {r["provider"]: r["p50"] for r in rows[-4 * len(impls):]
                  if r["metric"] == "ms" and r["mode"] == "forward"}
            print(f"{dt_name} B{B} T{T} H{H} D{D}: fwd xlk {ms['xlkernels']:.3f} ms torch {ms['torch']:.3f} ms",
                  flush=True)
    path = common.record(rows, args.name or "head_steer" + ("-quick" if args.quick else ""),
                         meta={"clock": args.clock if dev.type == "cpu" else "cuda-events"})
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
