"""Run every CUDA C++ kernel once on odd shapes, for compute-sanitizer (memcheck / racecheck) to watch.

python scripts/gpu_sanitize.py   (exits 1 on a wrong result; the sanitizer reports memory errors and races)
"""
import sys

import torch

import xlkernels
from xlkernels import NeuronIntervention, NeuronStats


def main() -> int:
    assert torch.cuda.is_available() and xlkernels.ext_info()["cuda"], "needs a GPU and the CUDA build"
    dev, bad = "cuda", []
    with xlkernels.backend("cuda"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for n, nn in ((1, 1), (37, 13), (300, 4099)):  # odd sizes, runs of one id longer than 16 rows
                g = torch.randn(n, nn, device=dev, dtype=dtype, requires_grad=True)
                u = torch.randn(n, nn, device=dev, dtype=dtype, requires_grad=True)
                ids = torch.randint(-1, 3, (n,), device=dev).sort().values
                stats = NeuronStats.empty(3, nn, device=dev)
                iv = NeuronIntervention.set(torch.tensor([0]), torch.randn(3, 1), nn, device=dev)
                y = xlkernels.glu(g, u, "silu", stats=stats, group_ids=ids, intervention=iv)
                y.backward(torch.randn_like(y))
                xlkernels.neuron_stats(torch.randn(n, nn, device=dev, dtype=dtype), ids, 3, stats=stats)
                if not torch.isfinite(y).all() or stats.tokens.sum() != 2 * (ids >= 0).sum():
                    bad.append(f"glu/neuron_stats {dtype} {n}x{nn}")
            for B, T, H, D in ((2, 17, 3, 80), (1, 5, 2, 1025), (1, 3, 1, 4097)):  # D past 1024 threads
                o = torch.randn(B, T, H, D, device=dev, dtype=dtype, requires_grad=True)
                gate = torch.rand(B, H, device=dev, requires_grad=True)
                shift = torch.randn(H, D, device=dev, requires_grad=True)
                out = xlkernels.head_steer(o, gate, shift)
                out.backward(torch.randn_like(out))
                want = (o.detach().double() * gate.detach().double()[:, None, :, None] + shift.detach().double())
                if (out.detach().double() - want).abs().max() > 1e-2 * want.abs().max():
                    bad.append(f"head_steer {dtype} {B, T, H, D}")
    torch.cuda.synchronize()
    print("gpu_sanitize:", "OK" if not bad else f"WRONG: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
