"""xlkernels: fused kernels for steering and instrumenting multilingual LLMs."""
import importlib

from ._ext import ext_info
from .backends import BACKENDS, BackendUnavailable, backend

__version__ = "0.1.0"

# Public names, imported on first use so `import xlkernels` stays cheap.
_LAZY = {
    "neuron_stats": "xlkernels.ops.neuron_stats",
    "glu": "xlkernels.ops.glu",
    "head_steer": "xlkernels.ops.head_steer",
    "steered_attention": "xlkernels.ops.steered_attention",
    "NeuronStats": "xlkernels.stats",
    "NeuronIntervention": "xlkernels.intervention",
    "patch": "xlkernels.hf",
    "unpatch": "xlkernels.hf",
    "Steerer": "xlkernels.hf",
}
_SUBMODULES = ("ops", "hf", "models", "analysis", "reference")


def __getattr__(name):
    if name in _LAZY:
        value = globals()[name] = getattr(importlib.import_module(_LAZY[name]), name)  # later lookups are plain
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"xlkernels.{name}")
    raise AttributeError(f"module 'xlkernels' has no attribute {name!r}")


def load_ops() -> None:
    """Import every op module so each registers its torch.library ops and backends."""
    for mod in ("neuron_stats", "glu", "head_steer", "steered_attention"):
        try:
            importlib.import_module(f"xlkernels.ops.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"xlkernels.ops.{mod}":
                raise


__all__ = ["BACKENDS", "BackendUnavailable", "backend", "ext_info", "load_ops", "__version__", *_LAZY]
