"""Load the CMake-built library in a fresh process (without the pip-installed one) and run its ops."""
import glob
import sys

import torch

lib = glob.glob(f"{sys.argv[1]}/_C*.so")
if not lib:
    sys.exit(f"no _C*.so under {sys.argv[1]}")
torch.ops.load_library(lib[0])
names = sorted({s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("xlkernels::")})
print("cmake build registers:", ", ".join(names))
assert torch.ops.xlkernels._with_cuda() is False or torch.cuda.is_available()
if hasattr(torch.ops.xlkernels, "neuron_stats_accum"):
    act = torch.randn(7, 13)
    ids = torch.tensor([0, 1, 1, -1, 0, 2, 2])
    t = torch.zeros(3, dtype=torch.int64)
    pos = torch.zeros(3, 13, dtype=torch.int64)
    s = torch.zeros(3, 13, dtype=torch.float64)
    s2 = torch.zeros(3, 13, dtype=torch.float64)
    mx = torch.full((3, 13), float("-inf"))
    torch.ops.xlkernels.neuron_stats_accum(act, ids, t, pos, s, s2, mx)
    assert t.tolist() == [2, 2, 2], t
    assert torch.equal(pos[1], ((act[1:3] > 0).sum(0)))
    print("cmake build: neuron_stats_accum OK")
