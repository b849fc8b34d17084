"""Supported architectures, as data: where the layers, attention and gated MLP live in each HF model.

A row names attributes only; no model code is copied. `model_type` is that of the text config.
"""
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Arch:
    name: str
    gate: str = "gate_proj"        # gate projection (None when fused)
    up: str = "up_proj"            # up projection (None when fused)
    gate_up: "str | None" = None   # fused [gate; up] projection (Phi-3)
    down: str = "down_proj"
    act: str = "act_fn"            # activation module attribute on the MLP
    attn: str = "self_attn"
    mlp: str = "mlp"
    notes: str = ""


ARCHS = {
    "llama": Arch("Llama"),
    "mistral": Arch("Mistral", notes="sliding_window"),
    "qwen2": Arch("Qwen2", notes="sliding_window on some layers"),
    "qwen3": Arch("Qwen3", notes="q/k norm"),
    "gemma": Arch("Gemma"),
    "gemma2": Arch("Gemma2", notes="logit softcap, alternating sliding layers"),
    "gemma3_text": Arch("Gemma3", notes="sliding + full layers, head_dim 256"),
    "cohere": Arch("Cohere (Aya-23)", notes="parallel attention/MLP block"),
    "phi3": Arch("Phi-3", gate=None, up=None, gate_up="gate_up_proj", act="activation_fn"),
    "olmo2": Arch("OLMo-2"),
}

# Where the decoder layers of the text model may live, tried in order.
LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.layers", "model.decoder.layers", "layers")


def activation_name(act: nn.Module) -> "str | None":
    """'silu' or 'gelu_tanh' for a supported activation module, else None."""
    from transformers import activations as A

    if isinstance(act, (A.SiLUActivation, nn.SiLU)):
        return "silu"
    if isinstance(act, (A.GELUTanh, A.NewGELUActivation, A.FastGELUActivation)):
        return "gelu_tanh"
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        return "gelu_tanh"
    return None


def _get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layers(model: nn.Module) -> "nn.ModuleList | None":
    """The decoder layer list of a text model (any architecture), or None."""
    return next((x for x in (_get(model, p) for p in LAYER_PATHS) if isinstance(x, nn.ModuleList)), None)


def resolve(model: nn.Module):
    """(arch, text_config, layers) for `model`; raises ValueError naming what is missing."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"xlkernels.patch: {cls} has no `config`; pass a Hugging Face PreTrainedModel")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    mtype = getattr(text, "model_type", None)
    arch = ARCHS.get(mtype)
    if arch is None:
        raise ValueError(
            f"xlkernels.patch: unsupported model {cls} (model_type {mtype!r}): no entry in the architecture table "
            f"xlkernels.hf.archs.ARCHS (supported: {', '.join(sorted(ARCHS))})")
    layers = find_layers(model)
    if layers is None:
        raise ValueError(f"xlkernels.patch: {cls}: decoder layers not found at any of {LAYER_PATHS}")
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, arch.attn, None), getattr(layer, arch.mlp, None)
        if attn is None or getattr(attn, "layer_idx", None) != i:
            raise ValueError(f"xlkernels.patch: {cls}: layer {i} has no `{arch.attn}` with layer_idx={i}")
        if mlp is None:
            raise ValueError(f"xlkernels.patch: {cls}: layer {i} has no `{arch.mlp}`")
        names = [arch.gate_up] if arch.gate_up else [arch.gate, arch.up]
        for n in names + [arch.down, arch.act]:
            if not isinstance(getattr(mlp, n, None), nn.Module):
                raise ValueError(f"xlkernels.patch: {cls}: layer {i} MLP ({type(mlp).__name__}) has no `{n}` "
                                 f"(expected a gated MLP)")
        if activation_name(getattr(mlp, arch.act)) is None:
            raise ValueError(f"xlkernels.patch: {cls}: layer {i} MLP activation {type(getattr(mlp, arch.act)).__name__}"
                             " is not supported (need SiLU or tanh-GELU)")
    return arch, text, layers
