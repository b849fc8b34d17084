"""Launch helpers shared by the Triton kernels: NaN-poisoned outputs (tests), grids inside CUDA's limits, and
a test override that runs the GPU launch shapes under the interpreter."""
import functools

import torch
import triton
import triton.language as tl

from ..backends import interpreting

POISON = False  # tests set this: every output buffer starts as NaN, so each element must be written
AXIS_MAX = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0 allows 2**31 - 1)
# Tests set GPU = {"sms": n, "config": i}: size grids and tiles as on an n-SM GPU, and run config i of each
# attention config table instead of autotuning (under the interpreter, or on a GPU to pin a config).
GPU = {}


def empty(*shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(x):
    return torch.full_like(x, float("nan")) if POISON else torch.empty_like(x)


def gpu_shapes() -> bool:
    """True where launches take their GPU tile shapes: compiled, or under the interpreter with GPU set."""
    return not interpreting() or bool(GPU)


@functools.lru_cache(maxsize=None)
def _device_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device):
    """SMs to size a grid for: GPU["sms"] if set, the device's on a compiled GPU run, else None (interpreter:
    few, large programs)."""
    if "sms" in GPU:
        return GPU["sms"]
    if interpreting() or device.type != "cuda":
        return None
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def fold(n0: int, n: int) -> tuple:
    """Grid (n0, y, z) for n0 x n programs: the n go over axes 1 and 2 (y * z >= n, each <= AXIS_MAX).
    Kernels read that index with folded_id() and skip it when >= n."""
    z = triton.cdiv(n, AXIS_MAX)
    grid = (n0, triton.cdiv(n, z), z)
    if n0 > 2 ** 31 - 1 or z > AXIS_MAX:
        raise ValueError(f"grid for {n0} x {n} programs exceeds CUDA's limits")
    return grid


@triton.jit
def folded_id():
    return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
