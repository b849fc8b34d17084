"""INCLINE: Inference-Time Cross-Lingual Intervention (Wang, Wu, Haddow, Birch, ACL 2025), methods.md 6.

Fit: per layer l, W_l = argmin ||X_src,l W - X_en,l||_F (least squares, no bias, min-norm solution as
numpy's lstsq), where X are token-mean representations of parallel sentences. site "block" (default, the
paper's hidden-state variant: decoder block output = residual stream) or "mlp" (the released code: the
MLP output). `augment=True` reproduces the code's augmentation: odd pairs become (src + " " + en,
en + " " + en).
Inference: a clean prefill gives h_l at the last prompt token of every layer; a second run overwrites
that position with h_l + sigma * (h_l W_l) in all layers at once, at prefill only (decode steps see it
through the KV cache).
"""
import contextlib
import os

import torch

from . import latent

SIGMA_GRID = tuple(round(-1 + 0.1 * i, 1) for i in range(21))   # -1.0 ... 1.0


class INCLINE:
    def __init__(self, W: torch.Tensor, site="block", src=None):
        if site not in latent.SITES:
            raise ValueError(f"site must be one of {latent.SITES}, got {site!r}")
        if W.dim() != 3 or W.shape[1] != W.shape[2]:
            raise ValueError(f"W must be (L, D, D), got {tuple(W.shape)}")
        self.W, self.site, self.src = W, site, src

    @classmethod
    def fit_features(cls, X_src, X_en, site="block", src=None):
        """W_l from pooled representations X_src, X_en: (L, N, D) each."""
        if X_src.shape != X_en.shape or X_src.dim() != 3:
            raise ValueError(f"X_src and X_en must both be (L, N, D), got {tuple(X_src.shape)} and "
                             f"{tuple(X_en.shape)}")
        W = torch.linalg.lstsq(X_src.to(torch.float64), X_en.to(torch.float64), driver="gelsd").solution
        return cls(W.to(torch.float32), site, src)

    @classmethod
    def fit(cls, model, tok, src_texts, en_texts, site="block", augment=True, n=500, batch_size=8,
            max_length=500, src=None):
        """Fit from parallel sentences (the first `n` pairs; INCLINE uses 500)."""
        src_texts, en_texts = list(src_texts)[:n], list(en_texts)[:n]
        if len(src_texts) != len(en_texts):
            raise ValueError(f"src_texts and en_texts must be parallel, got {len(src_texts)} and {len(en_texts)}")
        if len(src_texts) < 2:
            raise ValueError("INCLINE needs at least 2 parallel pairs")
        if augment:
            src_texts = [s + " " + e if i % 2 else s for i, (s, e) in enumerate(zip(src_texts, en_texts))]
            en_texts = [e + " " + e if i % 2 else e for i, e in enumerate(en_texts)]
        Xs = latent.pooled_states(model, tok, src_texts, site=site, batch_size=batch_size, max_length=max_length)
        Xe = latent.pooled_states(model, tok, en_texts, site=site, batch_size=batch_size, max_length=max_length)
        return cls.fit_features(Xs, Xe, site, src)

    def targets(self, model, batch, sigma):
        """{layer: (B, D)}: h + sigma * (h W_l) from a clean pass at the last real prompt token."""
        h = latent.last_token_states(model, batch, site=self.site)
        if len(h) != self.W.shape[0]:
            raise ValueError(f"model has {len(h)} layers but W was fitted for {self.W.shape[0]}")
        W = self.W.to(next(iter(h.values())).device)
        return {l: v + sigma * (v.to(W.dtype) @ W[l]).to(v.dtype) for l, v in h.items()}

    @contextlib.contextmanager
    def inject(self, model, batch, sigma):
        """Run the clean pass on `batch` (input_ids, attention_mask), then patch every layer at the last
        prompt token in prefill calls made inside the block (e.g. model.generate(**batch))."""
        with latent.inject(model, set_last=self.targets(model, batch, sigma), site=self.site) as st:
            yield st

    def generate(self, model, batch, sigma, **gen_kwargs):
        with self.inject(model, batch, sigma):
            return model.generate(**batch, **gen_kwargs)

    def save(self, path):
        from safetensors.torch import save_file
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({"W": self.W.contiguous()}, os.fspath(path), metadata={"site": self.site, "src": self.src or ""})

    @classmethod
    def load(cls, path):
        from xlkernels.files import FileError, read_safetensors
        meta, t = read_safetensors(path, keys=("W",))
        try:
            return cls(t["W"], meta["site"], meta["src"] or None)
        except (KeyError, ValueError, TypeError) as e:
            raise FileError(path, f"not an INCLINE file ({type(e).__name__}: {e})") from None


def select_sigma(score_fn, grid=SIGMA_GRID):
    """Grid search: score_fn(sigma) -> float (higher is better). Returns (best_sigma, {sigma: score})."""
    scores = {float(s): float(score_fn(s)) for s in grid}
    if not scores:
        raise ValueError("grid is empty")
    best = max(scores, key=lambda s: (scores[s], -abs(s)))
    return best, scores
