"""Check an installed xlkernels (make pip-check): it is imported from `--site` (the venv's site-packages, not a
checkout), xlkernels._C is loaded and built for the running torch, and every compiled CPU op agrees with the
pure-PyTorch reference. Exit status 0 only if all of that holds.

    python scripts/check_pip_install.py --site "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"""
import argparse
import os
import sys

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--site", required=True, help="where xlkernels must be imported from")
ap.add_argument("--how", default=None, help="how _C must have been obtained: prebuilt, cached or compiled")
args = ap.parse_args()

import xlkernels  # noqa: E402

fail = []
where = os.path.realpath(xlkernels.__file__)
if not where.startswith(os.path.realpath(args.site) + os.sep):
    fail.append(f"xlkernels was imported from {where}, not from {args.site}")
info = xlkernels.ext_info()
print(f"torch {torch.__version__}; xlkernels from {os.path.dirname(where)}")
print(f"ext_info: {info}")
if not info["cpu"]:
    fail.append(f"xlkernels._C did not load: {info['error']}")
elif info["torch"] != torch.__version__:
    fail.append(f"xlkernels._C was built for torch {info['torch']}, not the running {torch.__version__}")
if args.how and info["how"] != args.how:
    fail.append(f"xlkernels._C was {info['how']}, expected {args.how}")

if not fail:
    torch.manual_seed(0)
    gate, up = torch.randn(6, 40), torch.randn(6, 40)
    o, g, s = torch.randn(2, 5, 3, 8), torch.rand(2, 3), torch.randn(3, 8)
    act, ids = torch.randn(9, 300), torch.tensor([0, 1, -1, 1, 0, 2, 2, 2, -1])
    out = {}
    for backend in ("cpu", "reference"):
        with xlkernels.backend(backend):
            st = xlkernels.neuron_stats(act, ids, 3)
            out[backend] = {"glu silu": xlkernels.glu(gate, up, "silu"),
                            "glu gelu_tanh": xlkernels.glu(gate, up, "gelu_tanh"),
                            "head_steer": xlkernels.head_steer(o, g, s),
                            "neuron_stats.tokens": st.tokens, "neuron_stats.positive": st.positive,
                            "neuron_stats.sum": st.sum, "neuron_stats.max": st.max}
    for name, ref in out["reference"].items():
        got = out["cpu"][name]
        try:
            torch.testing.assert_close(got.to(ref.dtype), ref, rtol=1e-5, atol=1e-5)
            print(f"  {name:<24} cpu == reference")
        except AssertionError as e:
            fail.append(f"{name}: the cpu backend differs from the reference: {str(e).splitlines()[0]}")

for f in fail:
    print("FAIL:", f)
print(f"pip install check: {'FAILED' if fail else 'OK'}")
sys.exit(1 if fail else 0)
