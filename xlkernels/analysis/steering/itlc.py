"""ITLC: Inference-Time Language Control (Lopo/Cahyawijaya et al., MRL 2025), methods.md section 5.

Fit: mean-pooled hidden states hidden_states[layer] (layer = L // 2 by default, i.e. the output of block
layer-1) per language -> StandardScaler -> LDA (own SVD-solver implementation, as sklearn's default) ->
linear probe on the LDA space -> active dims (|W_probe[k, d]| > threshold) -> language vectors v_k
(class means of the LDA features on active dims) -> back-projection u_k = v_k @ pinv(scalings).
Inject: s = alpha * (u_tgt - u_src) (cross-lingual) or alpha * u_tgt, added to the output of block
layer-1 (the residual stream), per strategy prompt_only / gen_only / prompt_and_gen.

Other differences from the released code: the 80/20 split is stratified per language; n_components
defaults to K-1 (the code hard-codes 100 for 204 FLORES languages); states come in the model's dtype
(the code uses fp16 autocast); the probe's epochs / lr are arguments (10 / 1e-3 as the code by default).

Deviation switch: like the released code, the default does NOT invert the StandardScaler (u lives in
standardized units but is added to raw states). `unscale=True` multiplies u by the scaler's std, which
maps the shift back to raw hidden units (for differences u_tgt - u_src the scaler mean cancels).
"""
import json
import os

import torch

from . import latent
from ..align import embed


def lda_fit(X: torch.Tensor, y: torch.Tensor, num_classes: int, n_components=None, tol=1e-4):
    """Linear discriminant analysis (sklearn's 'svd' solver). X (N, D), y (N,) in [0, K).

    Returns dict(xbar (D,), scalings (D, r), means (K, D)); features Z = (X - xbar) @ scalings[:, :n].
    Within-class covariance is whitened; columns are ordered by between-class variance.
    """
    X = X.to(torch.float64)
    N, D = X.shape
    K = num_classes
    counts = torch.bincount(y, minlength=K).to(torch.float64)
    if (counts == 0).any():
        raise ValueError(f"class {int((counts == 0).nonzero()[0])} has no samples")
    if N <= K:
        raise ValueError(f"LDA needs more samples than classes, got N={N}, K={K}")
    means = torch.zeros(K, D, dtype=torch.float64).index_add_(0, y, X) / counts[:, None]
    priors = counts / N
    xbar = priors @ means
    Xc = X - means[y]
    std = Xc.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    fac = 1.0 / (N - K)
    _, S, Vt = torch.linalg.svd((fac ** 0.5) * Xc / std, full_matrices=False)
    rank = int((S > tol).sum())
    if rank == 0:
        raise ValueError("X has no within-class variance")
    scalings = (Vt[:rank] / std).T / S[:rank]
    Xb = ((N * priors * fac).sqrt()[:, None] * (means - xbar)) @ scalings
    _, S2, Vt2 = torch.linalg.svd(Xb, full_matrices=False)
    rank2 = int((S2 > tol * S2[0]).sum())
    scalings = scalings @ Vt2.T[:, :rank2]
    n_max = min(K - 1, rank2)
    n = n_max if n_components is None else int(n_components)
    if not 1 <= n <= n_max:
        raise ValueError(f"n_components must be in [1, {n_max}] (classes - 1 and rank), got {n}")
    return {"xbar": xbar, "scalings": scalings[:, :n], "means": means}


def train_probe(Z, y, num_classes, epochs=10, lr=1e-3, batch_size=128, seed=0):
    """nn.Linear(n, K) trained with Adam + cross-entropy (ITLC's probe). -> (weight (K, n), bias (K,))."""
    g = torch.Generator().manual_seed(seed)
    Z = Z.to(torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(Z.shape[1], num_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(Z), generator=g)
            for s in range(0, len(Z), batch_size):
                idx = perm[s:s + batch_size]
                loss = torch.nn.functional.cross_entropy(probe(Z[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return probe.weight.detach().clone(), probe.bias.detach().clone()


class ITLC:
    """Fitted ITLC language vectors. Build with ITLC.fit (from a model) or ITLC.fit_features (arrays)."""

    def __init__(self, langs, layer, mean, std, xbar, scalings, probe_weight, probe_bias, active, vectors,
                 accuracy=float("nan"), threshold=0.01):
        self.langs, self.layer = list(langs), int(layer)
        self.mean, self.std, self.xbar, self.scalings = mean, std, xbar, scalings
        self.probe_weight, self.probe_bias = probe_weight, probe_bias
        self.active, self.vectors = active, vectors
        self.accuracy, self.threshold = float(accuracy), float(threshold)
        self.back = vectors.to(torch.float64) @ torch.linalg.pinv(scalings.to(torch.float64))   # (K, D) = u_k

    # -- fitting -------------------------------------------------------------------------------------
    @classmethod
    def fit_features(cls, X, y, langs, layer=0, n_components=None, threshold=0.01, epochs=10, lr=1e-3,
                     test_size=0.2, seed=42):
        """Fit from pooled states X (N, D) with language ids y (N,) indexing `langs`."""
        X = torch.as_tensor(X).to(torch.float64)
        y = torch.as_tensor(y).long()
        K = len(langs)
        if X.dim() != 2 or y.shape != X.shape[:1]:
            raise ValueError(f"X must be (N, D) and y (N,), got {tuple(X.shape)} and {tuple(y.shape)}")
        g = torch.Generator().manual_seed(seed)
        train, test = [], []
        for k in range(K):   # stratified split
            idx = (y == k).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_test = int(round(len(idx) * test_size)) if len(idx) > 1 else 0
            test.append(idx[:n_test])
            train.append(idx[n_test:])
        train, test = torch.cat(train), torch.cat(test)
        mean = X[train].mean(0)
        std = X[train].std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        Xs = (X - mean) / std
        lda = lda_fit(Xs[train], y[train], K, n_components)
        Z = (Xs - lda["xbar"]) @ lda["scalings"]
        W, b = train_probe(Z[train], y[train], K, epochs=epochs, lr=lr, seed=seed)
        acc = float("nan")
        if len(test):
            pred = (Z[test].float() @ W.T + b).argmax(-1)
            acc = float((pred == y[test]).float().mean())
        active = W.abs() > threshold                              # (K, n)
        counts = torch.bincount(y[train], minlength=K).to(torch.float64)
        class_means = torch.zeros(K, Z.shape[1], dtype=torch.float64).index_add_(0, y[train], Z[train])
        vectors = torch.where(active, class_means / counts[:, None], torch.zeros_like(class_means))
        return cls(langs, layer, mean, std, lda["xbar"], lda["scalings"], W, b, active, vectors, acc, threshold)

    @classmethod
    def fit(cls, model, tok, corpus: dict, layer=None, batch_size=8, max_length=512, **kw):
        """Fit on texts per language {lang: [texts]} (need not be parallel). layer: index into
        hidden_states (default num_layers // 2; injection then hooks block layer-1)."""
        n_layers = model.config.get_text_config().num_hidden_layers
        layer = n_layers // 2 if layer is None else int(layer)
        if not 1 <= layer <= n_layers - 1:
            raise ValueError(f"layer must be in [1, {n_layers - 1}] (a hidden_states index after a block "
                             f"and before the final norm), got {layer}")
        langs = list(corpus)
        if len(langs) < 2:
            raise ValueError("ITLC needs at least 2 languages in corpus")
        X, y = [], []
        for k, lang in enumerate(langs):
            e = embed(model, tok, corpus[lang], "mean", batch_size, max_length)[layer]
            X.append(e)
            y += [k] * len(e)
        return cls.fit_features(torch.cat(X), torch.tensor(y), langs, layer, **kw)

    # -- use -----------------------------------------------------------------------------------------
    def _index(self, lang):
        if isinstance(lang, int):
            return lang
        if lang not in self.langs:
            raise ValueError(f"language {lang!r} was not fitted (have {', '.join(self.langs)})")
        return self.langs.index(lang)

    def transform(self, X):
        """LDA features of raw pooled states X (N, D) -> (N, n)."""
        X = torch.as_tensor(X).to(torch.float64)
        return ((X - self.mean) / self.std - self.xbar) @ self.scalings

    def predict(self, X):
        """Probe's language ids for raw pooled states X (N, D)."""
        return (self.transform(X).float() @ self.probe_weight.T + self.probe_bias).argmax(-1)

    def shift(self, tgt, src=None, alpha=0.5, unscale=False):
        """(D,) float32 shift: alpha * (u_tgt - u_src), or alpha * u_tgt without src. tgt/src may be
        lists (one per batch row) -> (B, D)."""
        def u(lang):
            v = self.back[self._index(lang)]
            return v * self.std if unscale else v
        if isinstance(tgt, (list, tuple)):
            srcs = src if isinstance(src, (list, tuple)) else [src] * len(tgt)
            return torch.stack([self.shift(t, s, alpha, unscale) for t, s in zip(tgt, srcs)])
        s = u(tgt) if src is None else u(tgt) - u(src)
        return (alpha * s).to(torch.float32)

    def inject(self, model, tgt, src=None, alpha=0.5, strategy="prompt_and_gen", unscale=False):
        """Context manager adding the shift to the output of block `layer - 1` (see latent.inject)."""
        return latent.inject(model, add={self.layer - 1: self.shift(tgt, src, alpha, unscale)},
                             strategy=strategy)

    # -- persistence ---------------------------------------------------------------------------------
    _TENSORS = ("mean", "std", "xbar", "scalings", "probe_weight", "probe_bias", "active", "vectors")

    def save(self, path):
        from safetensors.torch import save_file
        meta = {"langs": json.dumps(self.langs), "layer": str(self.layer), "accuracy": repr(self.accuracy),
                "threshold": repr(self.threshold)}
        tensors = {k: getattr(self, k).contiguous() for k in self._TENSORS}
        tensors["active"] = tensors["active"].to(torch.uint8)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path):
        from xlkernels.files import FileError, read_safetensors
        meta, t = read_safetensors(path, keys=cls._TENSORS)
        try:
            t["active"] = t["active"].bool()
            return cls(json.loads(meta["langs"]), int(meta["layer"]), accuracy=float(meta["accuracy"]),
                       threshold=float(meta["threshold"]), **t)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise FileError(path, f"not an ITLC file ({type(e).__name__}: {e})") from None
