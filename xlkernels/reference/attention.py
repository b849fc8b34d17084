"""Reference steered attention in plain PyTorch (runs in the input dtype; pass float64 for ground truth).

out[b,h] = gate[b,h] * softmax(mask(softcap(scale * q k^T))) v + shift[b,h]
"""
import torch


def visible(T: int, S: int, causal: bool, sliding_window, device) -> "torch.Tensor | None":
    """(T,S) bool: which keys each query row may see (None = all). Causal is aligned bottom-right;
    a sliding window W lets absolute position p = i + S - T see keys p - W < j <= p."""
    if not causal and sliding_window is None:
        return None
    i = torch.arange(T, device=device)[:, None] + (S - T)  # absolute query position
    j = torch.arange(S, device=device)[None, :]
    ok = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        ok = ok & (j <= i)
    if sliding_window is not None:
        ok = ok & (j > i - sliding_window) & (j <= i)  # p - W < j <= p, causal or not
    return ok


def full_mask(B, T, S, causal, sliding_window, key_padding_mask, device) -> "torch.Tensor | None":
    """(B,1,T,S) bool mask (True = attend), or None when every key is visible."""
    m = visible(T, S, causal, sliding_window, device)
    m = None if m is None else m[None, None]
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :]
        m = kp if m is None else (m & kp)
    if m is not None:
        m = m.expand(B, 1, T, S)
    return m


def expand_gate(gate, B, H, dtype):
    if gate is None:
        return None
    return gate.to(dtype).expand(B, H)


def expand_shift(shift, B, H, D, dtype):
    if shift is None:
        return None
    return shift.to(dtype).expand(B, H, D)


def attention_raw(q, k, v, *, causal=True, scale=None, key_padding_mask=None, sliding_window=None, softcap=None):
    """softmax attention without the gate/shift epilogue; rows that see no key give 0."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if scale is None:
        scale = D ** -0.5
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    m = full_mask(B, T, S, causal, sliding_window, key_padding_mask, q.device)
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    mx = s.amax(dim=-1, keepdim=True).detach()
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(s - mx)
    den = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(den == 0, torch.ones_like(den), den)
    return torch.matmul(p, v)


def steered_attention(q, k, v, *, gate=None, shift=None, causal=True, scale=None, key_padding_mask=None,
                      sliding_window=None, softcap=None):
    """(B,H,T,D) output, computed in q's dtype."""
    B, H, T, D = q.shape
    o = attention_raw(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                      sliding_window=sliding_window, softcap=softcap)
    g = expand_gate(gate, B, H, q.dtype)
    if g is not None:
        o = o * g[:, :, None, None]
    sh = expand_shift(shift, B, H, D, q.dtype)
    if sh is not None:
        o = o + sh[:, :, None, :]
    return o
