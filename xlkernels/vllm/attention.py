"""Head steering over whichever attention backend the engine selected (FLASH_ATTN, FLASHINFER, TRITON_ATTN,
FLEX_ATTENTION, CPU_ATTN, ...): after the model loads, each attention layer's impl gets a cached subclass of
its own class (`impl.__class__ = steered(type(impl))`), so isinstance checks, the MRO and the forward signature
stay the backend's. Its forward runs the backend, then ops.steer_heads on the output rows.

Refused, because the output cannot be steered there: MLA attention (its output is not per-head (Hl, D) before
o_proj) and fp8 output quantisation fused into attention (`output_scale`: the output is already quantised).
"""
from __future__ import annotations

import functools
import inspect

from . import ops

# The forward every supported backend has (vllm.v1.attention.backend.AttentionImpl, vLLM 0.32).
PARAMS = ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
          "output_block_scale")


def check_forward(cls) -> None:
    names = tuple(inspect.signature(cls.forward).parameters)
    if names != PARAMS:
        raise NotImplementedError(f"xlkernels.vllm cannot steer heads through {cls.__name__}: its forward takes "
                                  f"{names}, the wrapper expects {PARAMS}")


@functools.lru_cache(maxsize=None)
def steered(cls):
    """A subclass of the impl class `cls` whose forward steers the heads of its output."""
    check_forward(cls)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise RuntimeError(f"xlkernels.vllm cannot steer heads when attention quantises its output (fp8 "
                               f"output fusion in {cls.__name__}); turn off the fuse_attn_quant pass")
        out = cls.forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                          output_block_scale)
        ops.steer_heads(output, self._xlk_layer)
        return out

    forward.__qualname__ = f"Xlk{cls.__name__}.forward"
    forward.__doc__ = cls.forward.__doc__
    return type(f"Xlk{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__, "_xlk_steered": True})


def refusal(layer, impl) -> str | None:
    """Why this attention layer's output cannot be steered, or None."""
    from vllm.v1.attention.backend import AttentionImpl, MLAAttentionImpl
    if isinstance(impl, MLAAttentionImpl) or type(layer).__name__.startswith("MLA"):
        return f"{type(layer).__name__} uses MLA attention ({type(impl).__name__}), whose output has no per-head rows"
    if not isinstance(impl, AttentionImpl):
        return f"{type(impl).__name__} is not a vLLM AttentionImpl"
    return None


def wrap(layer, index: int, num_heads: int, head_dim: int) -> None:
    """Swap the layer's impl class for its steered subclass (idempotent)."""
    impl = layer.impl
    if getattr(type(impl), "_xlk_steered", False):
        impl._xlk_layer = index
        return
    hl, d = int(getattr(impl, "num_heads", num_heads)), int(getattr(impl, "head_size", head_dim))
    if (hl, d) != (num_heads, head_dim):
        raise NotImplementedError(f"{layer.layer_name}: {hl} heads of {d} on this rank, the model config says "
                                  f"{num_heads} of {head_dim}")
    impl.__class__ = steered(type(impl))
    impl._xlk_layer = index
