"""Gated-MLP forward routed through xlkernels.glu, bound per MLP instance (no class is modified). On the CPU
backend with nothing to record or edit and decode-sized inputs, the MLP's own activation runs (HF's exact
expression)."""
import types

from .. import backends
from ..ops.glu import glu, glu_checked

SMALL = 1 << 16  # elements of the gate projection up to which the unfused expression runs on CPU


def glu_forward(self, x):
    """act(gate(x)) * up(x) -> down, with the steerer's neuron stats and interventions fused into glu."""
    st = self.__dict__["_xlk_steerer"]
    if not st._active:
        return self._xlk_orig_forward(x)
    arch = st.arch
    if arch.gate_up:
        g, u = getattr(self, arch.gate_up)(x).chunk(2, dim=-1)
    else:
        g, u = getattr(self, arch.gate)(x), getattr(self, arch.up)(x)
    stats, group_ids, iv, checked = st._mlp_args(self._xlk_layer, g)
    if stats is None and iv is None and g.numel() <= SMALL and backends.select("glu", g.device) == "cpu":
        h = getattr(self, arch.act)(g) * u  # nothing to fuse, decode-sized: HF's expression was faster (NOTES.md)
    elif checked:
        mul, add = (None, None) if iv is None else (iv.mul, iv.add)
        h = glu_checked(g, u, self._xlk_act, group_ids if stats is not None else None, mul, add, stats)
    else:
        h = glu(g, u, self._xlk_act, stats=stats, group_ids=group_ids, intervention=iv)
    return getattr(self, arch.down)(h)


def bind(mlp, steerer, layer: int, act: str) -> None:
    """Route `mlp` through glu. Where accelerate hooked the module, its inner `_old_forward` is replaced."""
    slot = "_old_forward" if "_old_forward" in mlp.__dict__ else "forward"
    saved = mlp.__dict__.get(slot)
    d = mlp.__dict__
    d["_xlk_saved"] = (slot, saved)
    d["_xlk_orig_forward"] = saved if saved is not None else types.MethodType(type(mlp).forward, mlp)
    d["_xlk_steerer"], d["_xlk_layer"], d["_xlk_act"] = steerer, layer, act
    d[slot] = types.MethodType(glu_forward, mlp)


def unbind(mlp) -> None:
    d = mlp.__dict__
    if "_xlk_saved" not in d:
        return
    slot, saved = d.pop("_xlk_saved")
    if saved is None:
        d.pop(slot, None)
    else:
        d[slot] = saved
    for k in ("_xlk_orig_forward", "_xlk_steerer", "_xlk_layer", "_xlk_act"):
        d.pop(k, None)
