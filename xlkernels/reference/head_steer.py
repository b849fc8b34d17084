"""Reference head_steer: out[b,t,h,:] = gate[b,h] * o[b,t,h,:] + shift[b,h,:].

o (B,T,H,D); gate None | (H,) | (B,H); shift None | (H,D) | (B,H,D). Computes in float32 (float64 when o is
float64) and returns o's dtype. Where gate == 0 the output is exactly shift (0 without shift) even if o holds
NaN/inf there; gradients are those of gate*o + shift, with non-finite o at gate == 0 heads counted as 0.
"""
import torch


def head_steer(o: torch.Tensor, gate=None, shift=None) -> torch.Tensor:
    ct = torch.float64 if o.dtype == torch.float64 else torch.float32
    x = o.to(ct)
    B, T, H, D = o.shape
    if gate is not None:
        g = gate.to(ct)
        g = g.view(1, 1, H, 1) if g.dim() == 1 else g.view(B, 1, H, 1)
        x = torch.where((g == 0) & ~torch.isfinite(x), 0.0, x) * g
    if shift is not None:
        s = shift.to(ct)
        x = x + (s.view(1, 1, H, D) if s.dim() == 2 else s.view(B, 1, H, D))
    return x.to(o.dtype)
