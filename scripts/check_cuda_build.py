"""Check a CUDA build of xlkernels (no GPU needed): it is the one imported, ext_info() reports cuda, and every op
of the extension has a CUDA kernel (its own, or a composite one that serves every backend).

    PYTHONPATH=build/cuda/lib .venv-cuda/bin/python scripts/check_cuda_build.py build/cuda/lib
"""
import os
import sys

import torch

import xlkernels

C = torch._C
lib = os.path.realpath(sys.argv[1]) if len(sys.argv) > 1 else None
where = os.path.realpath(xlkernels.__file__)
info = xlkernels.ext_info()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); xlkernels from {os.path.dirname(where)}")
print(f"ext_info: {info}")
fail = []
if lib and not where.startswith(lib + os.sep):
    fail.append(f"xlkernels was imported from {where}, not from {lib}")
if not info["cuda"]:
    fail.append(f"ext_info() reports no CUDA kernels (error: {info['error']})")

names = sorted({s.name for s in C._jit_get_all_schemas() if s.name.startswith("xlkernels::")})
if not names:
    fail.append("no xlkernels:: ops are registered")
for name in names:
    packet = getattr(torch.ops.xlkernels, name.split("::", 1)[1])
    for ov in packet.overloads():
        op = getattr(packet, ov).name()
        if C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
            how = "CUDA kernel"
        elif any(C._dispatch_has_kernel_for_dispatch_key(op, k)
                 for k in ("CompositeExplicitAutograd", "CompositeImplicitAutograd")):
            how = "composite kernel (all backends)"
        else:
            how = "MISSING CUDA kernel"
            fail.append(f"{op} has no CUDA kernel")
        print(f"  {op:<34} {how}")

for f in fail:
    print("FAIL:", f)
print(f"cuda build check: {len(names)} ops, {'FAILED' if fail else 'OK'}")
sys.exit(1 if fail else 0)
