"""steered_attention (Triton) vs torch SDPA backends and FlexAttention: the FlashAttention benchmark grid.

python -m bench.bench_attention [--quick] [--smoke] [--dtype bfloat16]
Grid (FlashAttention's): hidden 2048 (H = 2048/D), B*S = 16k, D in {64, 128}, causal and not. Rows: ms and
TFLOP/s (FA's count: 4*B*S^2*H*D, /2 when causal; backward 2.5x, fwd+bwd 3.5x) for forward, backward, full,
steering off and on (gate (H,) + shift (H,D), both requiring grad). Plus the head-skip curve (share of heads
with gate 0, no gate grad) and T=1 decode (GB/s of K/V read). Needs a GPU; --smoke runs one tiny config on CPU
under TRITON_INTERPRET=1 so the script cannot rot. Targets (H100, bf16, D=128, S>=2k): forward steered >= 1.0x
the fastest SDPA backend unsteered; backward with gate/shift grads >= 0.95x; 50% heads masked <= 0.6x time.
"""
import argparse
import os
import sys
import tempfile

import torch

if not torch.cuda.is_available():  # the kernels must be defined in interpreter mode on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import xlkernels  # noqa: E402
from bench import common  # noqa: E402
from xlkernels import backend  # noqa: E402

GRID_BS = [(32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384)]
QUICK_BS = [(8, 2048), (2, 8192)]
HIDDEN = 2048
MODE_FACTOR = {"forward": 1.0, "backward": 2.5, "full": 3.5}


def flops(B, H, S, D, causal, mode):
    f = 4 * B * S * S * H * D * MODE_FACTOR[mode]
    return f / 2 if causal else f


def sdpa_provider(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
         "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kind]

    def fn(q, k, v, causal, gate=None, shift=None):
        with sdpa_kernel([b]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


_flex_cache = {}


def flex_provider():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v, causal, gate=None, shift=None):
        B, H, S, _ = q.shape
        mask = None
        if causal:
            key = (B, H, S, q.device)
            if key not in _flex_cache:
                _flex_cache[key] = create_block_mask(lambda b, h, i, j: j <= i, None, None, S, S, device=q.device)
            mask = _flex_cache[key]
        return compiled(q, k, v, block_mask=mask)
    return fn


def xlk_provider(be="triton", tma=None):
    """tma: None = the library's choice, "0" = the pointer forward even on Hopper (XLKERNELS_TMA)."""
    from xlkernels.triton import attention_tma

    def fn(q, k, v, causal, gate=None, shift=None):
        saved = attention_tma.MODE
        attention_tma.MODE = tma or saved
        try:
            with backend(be):
                return xlkernels.steered_attention(q, k, v, gate=gate, shift=shift, causal=causal)
        finally:
            attention_tma.MODE = saved
    return fn


def inputs(B, H, S, D, dtype, dev, steer, grad):
    # HF layout: (B,H,S,D) views of (B,S,H,D) memory
    mk = lambda: torch.randn(B, S, H, D, device=dev, dtype=dtype).transpose(1, 2).requires_grad_(grad)  # noqa
    q, k, v = mk(), mk(), mk()
    gate = shift = None
    if steer:
        gate = (torch.rand(H, device=dev) + 0.5).requires_grad_(grad)
        shift = (torch.randn(H, D, device=dev) * 0.1).requires_grad_(grad)
    return q, k, v, gate, shift


def bench_one(rows, prov, fn, B, H, S, D, causal, dtype, dev, steer, warmup, rep, modes):
    shape = {"B": B, "H": H, "S": S, "D": D, "causal": causal, "dtype": str(dtype).replace("torch.", ""),
             "steer": steer}
    q, k, v, gate, shift = inputs(B, H, S, D, dtype, dev, steer, grad=True)
    leaves = [x for x in (q, k, v, gate, shift) if x is not None]
    out = {}
    try:
        if "forward" in modes:
            with torch.no_grad():
                out["forward"] = common.timeit(lambda: fn(q, k, v, causal, gate, shift), warmup, rep, device=dev)
        if "backward" in modes or "full" in modes:
            o = fn(q, k, v, causal, gate, shift)
            do = torch.randn_like(o)
            if "backward" in modes:
                out["backward"] = common.timeit(lambda: o.backward(do, retain_graph=True), warmup, rep,
                                                device=dev, grad_to_none=leaves)
            del o
            if "full" in modes:
                out["full"] = common.timeit(lambda: fn(q, k, v, causal, gate, shift).backward(do), warmup, rep,
                                            device=dev, grad_to_none=leaves)
    except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. a backend that does not support the shape
        print(f"  {prov}: skipped ({str(e).splitlines()[0][:100]})")
        return {}
    for mode, t in out.items():
        rows.append(common.row("steered_attention", prov, mode, shape, "ms", t))
        rows.append(common.row("steered_attention", prov, mode, shape, "TFLOP/s",
                               common.rate(t, flops(B, H, S, D, causal, mode), 1e12)))
    return {m: t["p50"] for m, t in out.items()}


def grid(args, rows, dev, dtype):
    warmup, rep = (3, 10) if args.quick else (5, 30)
    modes = ("forward", "backward", "full")
    sdpa = {f"sdpa-{k}": sdpa_provider(k) for k in ("flash", "efficient", "cudnn", "math")}
    summary = []
    for D in ([128] if args.quick else [64, 128]):
        H = HIDDEN // D
        for causal in (False, True):
            for B, S in (QUICK_BS if args.quick else GRID_BS):
                res = {}
                for steer in (False, True):
                    res[("xlkernels", steer)] = bench_one(rows, "xlkernels" + ("-steered" if steer else ""),
                                                          xlk_provider(), B, H, S, D, causal, dtype, dev, steer,
                                                          warmup, rep, modes)
                # the pointer forward in the same run: what TMA + warp specialisation buy on this GPU
                bench_one(rows, "xlkernels-steered-pointer", xlk_provider(tma="0"), B, H, S, D, causal, dtype, dev,
                          True, warmup, rep, ("forward",))
                # unfused baseline: SDPA + head_steer epilogue (xlkernels' own 'cuda' backend)
                bench_one(rows, "sdpa+head_steer-steered", xlk_provider("cuda"), B, H, S, D, causal, dtype, dev,
                          True, warmup, rep, modes)
                for name, fn in sdpa.items():
                    if name == "sdpa-math" and B * H * S * S * 2 * 8 > 40e9:
                        continue  # the TxS matrices do not fit
                    res[(name, False)] = bench_one(rows, name, fn, B, H, S, D, causal, dtype, dev, False, warmup,
                                                   rep, modes)
                try:
                    res[("flex", False)] = bench_one(rows, "flex", flex_provider(), B, H, S, D, causal, dtype, dev,
                                                     False, warmup, rep, modes)
                except Exception as e:  # noqa: BLE001 - flex needs a working inductor
                    print(f"  flex: skipped ({e})")
                best = {m: min((r[m] for (p, s), r in res.items() if p.startswith("sdpa") and m in r),
                               default=None) for m in modes}
                st = res[("xlkernels", True)]
                line = f"D{D} causal={causal} B{B} S{S}:"
                for m in modes:
                    if best[m] and m in st:
                        line += f" {m} steered {st[m]:.2f} ms = {best[m] / st[m]:.2f}x best SDPA"
                        summary.append((D, causal, S, m, best[m] / st[m]))
                print(line, flush=True)
    return summary


def head_skip(args, rows, dev, dtype):
    B, S, D = (2, 4096, 128) if args.quick else (4, 4096, 128)
    H = HIDDEN // D
    q, k, v, _, shift = inputs(B, H, S, D, dtype, dev, True, grad=False)
    base = None
    out = []
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        gate = torch.ones(B, H, device=dev)
        gate[:, : round(frac * H)] = 0.0
        with torch.no_grad(), backend("triton"):
            t = common.timeit(lambda: xlkernels.steered_attention(q, k, v, gate=gate, shift=shift, causal=True),
                              3, 20, device=dev)
        base = base or t["p50"]
        rows.append(common.row("steered_attention", "xlkernels", "forward-head-skip",
                               {"B": B, "H": H, "S": S, "D": D, "masked": frac}, "ms", t, relative=t["p50"] / base))
        out.append((frac, t["p50"] / base))
        print(f"head skip {frac:.0%} masked: {t['p50']:.3f} ms = {t['p50'] / base:.2f}x", flush=True)
    return out


def decode(args, rows, dev, dtype):
    D, H, Hkv = 128, 32, 8
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for B, S in ([(1, 8192), (16, 4096)] if args.quick else [(1, 4096), (1, 16384), (16, 4096), (64, 2048)]):
        q = torch.randn(B, H, 1, D, device=dev, dtype=dtype)
        k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
        v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
        gate = torch.rand(H, device=dev) + 0.5
        shift = torch.randn(H, D, device=dev)
        kv_bytes = 2 * k.numel() * k.element_size()
        shape = {"B": B, "H": H, "Hkv": Hkv, "S": S, "D": D}
        provs = {"xlkernels-steered": lambda: xlkernels.steered_attention(q, k, v, gate=gate, shift=shift),
                 "xlkernels": lambda: xlkernels.steered_attention(q, k, v)}
        for kind, b in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                        ("math", SDPBackend.MATH)):
            def f(b=b):
                with sdpa_kernel([b]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            provs[f"sdpa-{kind}"] = f
        for name, fn in provs.items():
            try:
                with torch.no_grad(), backend({"steered_attention": "triton"}):
                    t = common.timeit(fn, 5, 30, device=dev)
            except RuntimeError as e:
                print(f"  decode {name}: skipped ({str(e).splitlines()[0][:100]})")
                continue
            rows.append(common.row("steered_attention", name, "decode", shape, "ms", t))
            rows.append(common.row("steered_attention", name, "decode", shape, "GB/s", common.rate(t, kv_bytes)))
            print(f"decode B{B} S{S} {name}: {t['p50']:.3f} ms", flush=True)


def smoke():
    """One tiny config (CPU under the interpreter, else the GPU): checks that the script's code paths still run."""
    rows = []
    dev = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")
    B, H, S, D = 1, 2, 40, 64
    for steer in (False, True):
        bench_one(rows, "xlkernels" + ("-steered" if steer else ""), xlk_provider("triton"), B, H, S, D, True,
                  torch.float32, dev, steer, 1, 1, ("forward", "backward", "full"))
    bench_one(rows, "sdpa-math", sdpa_provider("math"), B, H, S, D, True, torch.float32, dev, False, 1, 1,
              ("forward", "backward"))
    bench_one(rows, "sdpa+head_steer-steered", xlk_provider(dev.type), B, H, S, D, True, torch.float32, dev, True, 1,
              1, ("forward",))
    assert rows and all(r["p50"] > 0 for r in rows), rows
    with tempfile.TemporaryDirectory() as tmp:
        common.record(rows, "attention-smoke", out_dir=tmp)
    print(f"smoke ok: {len(rows)} rows")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_attention", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="D=128, two (B,S) points, fewer repetitions")
    p.add_argument("--smoke", action="store_true", help="one tiny CPU config under the Triton interpreter")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--only", nargs="+", choices=("grid", "skip", "decode"), default=("grid", "skip", "decode"))
    args = p.parse_args(argv)
    if args.smoke or not torch.cuda.is_available():
        if not args.smoke:
            print("bench_attention needs a CUDA GPU; running --smoke instead")
        return smoke()
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    rows = []
    rows.append(common.row("matmul", "torch", "forward", "8192^3", "TFLOP/s", common.matmul_tflops(dev, dtype)))
    summary = grid(args, rows, dev, dtype) if "grid" in args.only else []
    skip = head_skip(args, rows, dev, dtype) if "skip" in args.only else []
    if "decode" in args.only:
        decode(args, rows, dev, dtype)
    path = common.record(rows, "attention" + ("-quick" if args.quick else ""))
    print(path)
    print("targets (D=128, S>=2k; ratio = best SDPA time / steered time):")
    for D, causal, S, m, r in summary:
        if D == 128 and S >= 2048 and m in ("forward", "backward"):
            need = 1.0 if m == "forward" else 0.95
            print(f"  {m:8s} causal={causal} S={S}: {r:.2f}x (target >= {need}) {'ok' if r >= need else 'MISS'}")
    for frac, rel in skip:
        if frac == 0.5:
            print(f"  head skip 50%: {rel:.2f}x time (target <= 0.6) {'ok' if rel <= 0.6 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
