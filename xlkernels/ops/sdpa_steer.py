"""The 'cpu' and 'cuda' backends of steered_attention: torch SDPA (its flash/cuDNN/math kernels), or math attention
when softcap is set (SDPA has none), then the compiled head_steer epilogue.

Own mask and math code, independent of xlkernels.reference (the tests' ground truth). Masks are written in terms of
the distance d = p - j between a query's absolute position p = i + S - T and key j: causal keeps d >= 0, a sliding
window W keeps 0 <= d < W.
"""
import torch


_masks: dict = {}  # (T, S, window, device) -> (1,1,T,S) causal(+window) mask, the last few shapes


def _causal(T, S, window, device):
    d = torch.arange(S - T, S, device=device)[:, None] - torch.arange(S, device=device)[None, :]
    keep = d >= 0
    if window is not None:
        keep = keep & (d < window)
    return keep.view(1, 1, T, S)


def _causal_cached(T, S, window, device):
    if torch.compiler.is_compiling():
        return _causal(T, S, window, device)
    key = (T, S, window, device)
    keep = _masks.get(key)
    if keep is None:
        keep = _causal(T, S, window, device)
        if T * S <= 1 << 22:  # at most 4 MB each
            if len(_masks) >= 8:
                _masks.pop(next(iter(_masks)))
            _masks[key] = keep
    return keep


def _keep(B, T, S, causal, window, key_padding_mask, device):
    """(B,1,T,S) bool (True = attend), or None when every key is visible."""
    keep = None
    if causal or window is not None:
        keep = _causal_cached(T, S, window, device)
    if key_padding_mask is not None:
        kp = key_padding_mask.view(B, 1, 1, S)
        keep = kp if keep is None else keep & kp
    return None if keep is None else keep.expand(B, 1, T, S)


def _open_empty_rows(keep):
    """(keep with rows that see no key opened to every key, those rows (B,1,T,1)): no NaN in the softmax; the
    caller zeroes the rows' output. (None, None) for no mask."""
    if keep is None:
        return None, None
    empty = ~keep.any(dim=-1, keepdim=True)
    return keep | empty, empty


def _softcap_attention(q, k, v, scale, softcap, keep):
    """Math attention with tanh softcapping, fp32 softmax; GQA by grouping query heads (no K/V copies).
    keep: (B,1,T,S) or None. Rows that see no key give 0."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv * T, D)
    s = torch.matmul(qg, k.transpose(-1, -2)).float().view(B, H, T, -1)
    s = torch.tanh(s * (scale / softcap)) * softcap
    keep, empty = _open_empty_rows(keep)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p.to(v.dtype).view(B, Hkv, -1, k.shape[2]), v).view(B, H, T, D)
    return o if empty is None else o.masked_fill(empty, 0.0)


def attention(q, k, v, causal, scale, key_padding_mask, window, softcap):
    """(B,H,T,D) raw attention (no epilogue)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    if causal and window is not None and S <= window:  # no visible key is W or more behind its query
        window = None
    if softcap is not None:
        return _softcap_attention(q, k, v, scale, softcap, _keep(B, T, S, causal, window, key_padding_mask, q.device))
    gqa = k.shape[1] != H
    # plain causal with T == S (prefill) or T == 1 (decode: the last position sees every key) needs no mask
    # tensor, which keeps SDPA on its flash/cuDNN kernels
    if key_padding_mask is None and window is None and (not causal or T == S or T == 1):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, scale=scale,
                                                                enable_gqa=gqa)
    keep, empty = _open_empty_rows(_keep(B, T, S, causal, window, key_padding_mask, q.device))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=gqa)
    return o.masked_fill(empty, 0.0)
