"""The one place that decides which backend runs an op.

Backends: 'cuda' (compiled CUDA C++), 'triton', 'cpu' (compiled C++), 'reference' (pure PyTorch).
Order of precedence: `with xlkernels.backend(...)`, then env XLKERNELS_BACKEND, then the default
for the tensor's device: on CUDA, ops listed in xlkernels.dispatch (steered_attention) pick per call from its
rule table, given the call's Facts. A forced backend that cannot run raises BackendUnavailable naming what is
missing.
"""
import contextlib
import contextvars
import functools
import os

import torch

from . import dispatch
from ._ext import ext_info

BACKENDS = ("cuda", "triton", "cpu", "reference")

# Backends each op implements. Ops register here when their module is imported.
OPS: dict[str, tuple[str, ...]] = {}

_forced: contextvars.ContextVar = contextvars.ContextVar("xlkernels_backend", default=None)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this op on these tensors."""


def register_op(name: str, backends: tuple[str, ...]) -> None:
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r} for op {name!r}")
    OPS[name] = tuple(backends)


@contextlib.contextmanager
def backend(name: "str | dict[str, str] | None"):
    """Force a backend: `with backend('triton'):` for every op, or `backend({'glu': 'cpu'})` per op."""
    if isinstance(name, str) and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if isinstance(name, dict):
        for op, b in name.items():
            if b not in BACKENDS:
                raise ValueError(f"backend for {op!r} must be one of {BACKENDS}, got {b!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


@functools.lru_cache(maxsize=None)
def triton_available() -> "str | None":
    """None if triton can be imported, else the reason."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on install
        return f"triton is not importable ({e})"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(op: str, name: str, device: torch.device) -> "str | None":
    """None if `name` can run `op` on `device`, else what is missing."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {BACKENDS}"
    if op not in OPS:  # op modules register on import; asking must not depend on what was imported before
        import importlib
        try:
            importlib.import_module(f"xlkernels.ops.{op}")
        except ModuleNotFoundError as e:
            if e.name != f"xlkernels.ops.{op}":
                raise
    if name not in OPS.get(op, ()):
        return f"op {op!r} has no {name!r} backend (it has {OPS.get(op, ())})"
    info = ext_info()
    if name == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend needs CPU tensors, got {device}"
        if not info["cpu"]:
            return f"xlkernels._C is not available ({info['error']})"
    elif name == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend needs CUDA tensors, got {device}"
        if not info["cuda"]:
            return ("xlkernels._C was built without CUDA kernels (torch is a CPU build, nvcc is missing, or "
                    "XLKERNELS_BUILD_CUDA=0)" if info["cpu"] else f"xlkernels._C is not available ({info['error']})")
    elif name == "triton":
        reason = triton_available()
        if reason:
            return reason
        if device.type == "cpu" and not interpreting():
            return "triton on CPU tensors needs TRITON_INTERPRET=1 set before xlkernels is imported"
        if device.type not in ("cpu", "cuda"):
            return f"triton cannot run on {device}"
    return None


def _default(op: str, device: torch.device) -> str:
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for name in order:
        if why_not(op, name, device) is None:
            return name
    return "reference"


def select(op: str, device: "torch.device | str", facts: "dispatch.Facts | None" = None) -> str:
    """The backend that runs `op` for tensors on `device`. With `facts` (a dispatch.Facts) an unforced op on CUDA
    is picked by the dispatch rule table. Under torch.compile the forced/available part is fixed once, at trace
    time (a ContextVar cannot be traced); the rules are traced (guards on the shapes they compare)."""
    ruled = facts is not None
    if torch.compiler.is_compiling():
        name, available = _select_at_trace(op, str(device), ruled)
    else:
        name, available = _select(op, device, ruled)
    return name if name is not None else dispatch.choose(facts, available)


@torch.compiler.assume_constant_result
def _select_at_trace(op: str, device: str, ruled: bool) -> tuple:
    return _select(op, device, ruled)


def forced(op: str) -> "str | None":
    """The backend forced for `op` by `with backend(...)` or XLKERNELS_BACKEND, else None."""
    name = _forced.get()
    if isinstance(name, dict):
        name = name.get(op)
    return name or os.environ.get("XLKERNELS_BACKEND") or None


# Unforced choices per (op, device, ruled): what can run does not change within a process (clear this after
# patching why_not in a test). A model forward asks several times per layer.
_unforced: dict = {}


def _select(op: str, device: "torch.device | str", ruled: bool = False) -> tuple:
    """(forced or default backend, ()) or, when the rule table decides, (None, the backends it may pick)."""
    name = forced(op)
    if name is None:
        key = (op, device, ruled)
        hit = _unforced.get(key)
        if hit is None:
            hit = _unforced[key] = _unforced_choice(op, torch.device(device), ruled)
        return hit
    device = torch.device(device)
    reason = why_not(op, name, device)
    if reason is not None:
        raise BackendUnavailable(f"xlkernels: backend {name!r} cannot run {op!r} on {device}: {reason}")
    return name, ()


def _unforced_choice(op: str, device: torch.device, ruled: bool) -> tuple:
    if ruled and device.type == "cuda" and op in dispatch.OPS:
        available = tuple(b for b in ("cuda", "triton") if why_not(op, b, device) is None)
        if available:
            return None, available
    return _default(op, device), ()
