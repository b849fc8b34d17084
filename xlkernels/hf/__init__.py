"""Drop-in Hugging Face integration: `steerer = xlkernels.patch(model)`, `xlkernels.unpatch(model)`.

patch() registers the steered attention kernel as HF attention implementation "xlkernels" (attention and mask
interfaces), switches the model to it, and routes every gated MLP through xlkernels.glu. Supported
architectures are listed as data in xlkernels.hf.archs.ARCHS.

    steerer = xlkernels.patch(model)           # logits unchanged (gates 1, shifts 0)
    steerer.mask_heads([(3, 1)])                 # gate 0 on layer 3, head 1 (HF's old head_mask semantics)
    steerer.shift[5] += v                        # add v (H, D) to layer 5's head outputs
    with steerer.record_neurons(group_ids, G) as stats:   # group_ids (B, T), -1 = padding
        model(**batch)
    with steerer.disabled():                     # plain HF path
        model(**batch)
    xlkernels.unpatch(model)
"""
from . import attention, mlp
from .archs import ARCHS, activation_name, resolve
from .steerer import HeadCapture, Steerer

attention.register()  # so from_pretrained(..., attn_implementation="xlkernels") works too (no steering state)


def patch(model) -> Steerer:
    """Patch `model` in place and return its Steerer (the same one if already patched)."""
    st = model.__dict__.get("_xlk_steerer")
    if st is not None:
        return st
    arch, config, layers = resolve(model)
    attention.register()
    orig = model.config._attn_implementation
    st = Steerer(model, arch, config, layers, orig)
    model.set_attn_implementation(attention.NAME)
    if config._attn_implementation != attention.NAME:
        model.set_attn_implementation(orig)
        raise ValueError(f"xlkernels.patch: {type(model).__name__} refused attention implementation "
                         f"{attention.NAME!r} (it does not use HF's AttentionInterface)")
    for i, layer in enumerate(layers):
        layer_attn, layer_mlp = getattr(layer, arch.attn), getattr(layer, arch.mlp)
        layer_attn.__dict__["_xlk_steerer"] = st
        mlp.bind(layer_mlp, st, i, activation_name(getattr(layer_mlp, arch.act)))
    model.__dict__["_xlk_steerer"] = st
    return st


def unpatch(model) -> None:
    """Undo patch(): original attention implementation and MLP forwards. No-op on an unpatched model."""
    st = model.__dict__.pop("_xlk_steerer", None)
    if st is None:
        return
    _, _, layers = resolve(model)
    for layer in layers:
        getattr(layer, st.arch.attn).__dict__.pop("_xlk_steerer", None)
        mlp.unbind(getattr(layer, st.arch.mlp))
    st._active = True
    model.set_attn_implementation(st._orig_impl)


__all__ = ["ARCHS", "HeadCapture", "Steerer", "patch", "unpatch"]
