"""Loads the compiled extension xlkernels._C, which registers torch.ops.xlkernels.*."""
import torch  # noqa: F401  (loads libtorch before _C)

try:
    from . import _C  # noqa: F401
    _ERROR = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    _ERROR = str(e)


def ext_info() -> dict:
    """What the compiled extension holds: {'cpu': bool, 'cuda': bool, 'error': str | None}."""
    return {"cpu": _C is not None, "cuda": bool(_C is not None and _C.WITH_CUDA), "error": _ERROR}
