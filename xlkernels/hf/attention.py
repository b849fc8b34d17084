"""The HF attention function and mask function registered under the name "xlkernels".

The mask function hands the kernel a 2D key padding mask (or None); causality and the sliding window are
applied inside the kernel, so no O(T*S) mask is built. Unusual masks (packed sequences, custom overlays,
bidirectional) get a full 4D bool mask instead, which the attention function applies in a math fallback.
"""
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

NAME = "xlkernels"


def _is_plain(fn) -> bool:
    """True for the causal and sliding-window-causal mask functions (what the kernel does itself)."""
    if fn is causal_mask_function:
        return True
    code = getattr(fn, "__code__", None)
    if getattr(fn, "__qualname__", "") != "and_masks.<locals>.and_mask" or code is None:
        return False
    cells = dict(zip(code.co_freevars, fn.__closure__ or ()))
    try:
        fns = cells["mask_functions"].cell_contents
    except (KeyError, ValueError):
        return False
    return (len(fns) == 2 and fns[1] is causal_mask_function
            and getattr(fns[0], "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask")


def mask_fn(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
            attention_mask=None, **kwargs):
    """2D bool padding mask (B, kv_length) or None for plain causal/sliding masks; else a 4D bool mask."""
    if _is_plain(mask_function):
        if attention_mask is None:
            return None
        m = attention_mask[:, -kv_length:]
        if m.dtype != torch.bool:
            m = m.bool()
        if m.shape[1] == kv_length and not torch.compiler.is_compiling() and bool(m.all()):
            return None
        return m
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


def _math_attention(q, k, v, mask, scale, softcap):
    """Attention under an arbitrary 4D mask (bool True = attend, or additive float). (B,H,T,D) out."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    mask = mask[..., : k.shape[-2]].to(s.device)
    if mask.dtype == torch.bool:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    else:
        s = s + mask.float()
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)


def attention_fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                 softcap=None, **kwargs):
    """HF AttentionInterface function: (B,H,T,D) q, (B,Hkv,S,D) k/v -> ((B,T,H,D) contiguous, None)."""
    from xlkernels import steered_attention

    if dropout:
        raise NotImplementedError("xlkernels attention does not implement attention dropout; "
                                  "call model.eval() or set attention_dropout=0")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("xlkernels attention does not return attention weights (output_attentions)")
    steerer = module.__dict__.get("_xlk_steerer")
    gate = shift = capture = None
    masked = False
    if steerer is not None:
        gate, shift, capture, masked = steerer._attn_args(module.layer_idx, query)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = softcap or None

    if attention_mask is not None and attention_mask.dim() == 4:
        out = _math_attention(query, key, value, attention_mask, scale, softcap)
        fused = False
    else:
        kpm = attention_mask
        if kpm is not None:
            n, S = kpm.shape[-1], key.shape[-2]
            if n < S:  # static cache: only the first n slots are filled
                key, value = key[:, :, :n], value[:, :, :n]
            elif n > S:
                kpm = kpm[:, -S:]
            kpm = kpm.to(device=query.device, dtype=torch.bool)
        fused = capture is None
        out = steered_attention(query, key, value, gate=gate if fused else None, shift=shift if fused else None,
                                causal=bool(is_causal), scale=scale, key_padding_mask=kpm,
                                sliding_window=sliding_window, softcap=softcap, masked_heads=masked and fused)
    out = out.transpose(1, 2)  # (B,T,H,D)
    if not fused:
        if capture is not None:
            capture(module.layer_idx, out)
        if gate is not None or shift is not None:
            from xlkernels import head_steer

            out = head_steer(out, gate, shift)
    return out.contiguous(), None


def register() -> None:
    """Register the attention and mask functions with HF (idempotent)."""
    AttentionInterface.register(NAME, attention_fn)
    AttentionMaskInterface.register(NAME, mask_fn)
