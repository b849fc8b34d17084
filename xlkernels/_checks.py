"""Argument checks shared by the ops. Each raises TypeError/ValueError naming the argument."""
import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def tensor(x, name: str, *, ndim=None, dtypes=None, device=None, shape=None):
    """Check that `x` is a tensor of the given rank, dtype, device and shape (None entries are free)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    if shape is not None:
        if len(shape) != x.dim() or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    return x


def same_device(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str):
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def ids_in_range(ids: torch.Tensor, name: str, num: int, *, allow_neg1: bool = True):
    """Check integer ids lie in [0, num) (or are -1 when allowed). Syncs once on CUDA."""
    if ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    low_ok = -1 if allow_neg1 else 0
    if lo < low_ok or hi >= num:
        bad = lo if lo < low_ok else hi
        rng = f"[-1, {num})" if allow_neg1 else f"[0, {num})"
        raise ValueError(f"{name} holds {bad}, outside {rng}")
