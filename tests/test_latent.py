"""Latent injection (ITLC, INCLINE) against slow per-sample references on tiny models."""
import pytest
import torch

from xlkernels.analysis.steering import latent
from xlkernels.analysis.align import embed
from xlkernels.analysis.steering.incline import INCLINE, SIGMA_GRID, select_sigma
from xlkernels.analysis.steering.itlc import ITLC, lda_fit
from xlkernels.models import tiny_model

PROMPTS = ["Hallo Welt, wie geht es?", "hi", "Enter a number."]


def _block(model, layer, site):
    layer_mod = model.model.layers[layer]
    return layer_mod if site == "block" else layer_mod.mlp


class _TokenHook:
    """Slow reference: a per-token Python loop over one unpadded sequence (batch 1)."""

    def __init__(self, fn):
        self.fn = fn   # fn(position, vector) -> new vector

    def __call__(self, module, args, output):
        h = output if isinstance(output, torch.Tensor) else output[0]
        h = h.clone()
        for t in range(h.shape[1]):
            h[0, t] = self.fn(t, h[0, t])
        return h if isinstance(output, torch.Tensor) else (h,) + tuple(output[1:])


def _greedy_no_cache(model, ids, steps, hooks):
    """Greedy decoding recomputing the whole sequence each step (no KV cache), hooks installed."""
    handles = [mod.register_forward_hook(h) for mod, h in hooks]
    try:
        seq = ids
        with torch.no_grad():
            for _ in range(steps):
                nxt = model(input_ids=seq, use_cache=False).logits[0, -1].argmax()
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    finally:
        for h in handles:
            h.remove()
    return seq[0, ids.shape[1]:]


def _batch(tok, side="left"):
    tok.padding_side = side
    return tok(PROMPTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize("arch,side", [("llama", "left"), ("gemma3", "left"), ("qwen2", "right")])
def test_add_prompt_matches_per_token_reference(arch, side):
    model, tok = tiny_model(arch)
    b = _batch(tok, side)
    shifts = torch.randn(len(PROMPTS), 64)
    seen = []
    with torch.no_grad(), latent.inject(model, add={0: shifts}, strategy="prompt_only"):
        rec = _block(model, 0, "block").register_forward_hook(lambda m, a, o: seen.append(o))
        mask = b["attention_mask"]
        got = model(**b, position_ids=latent.position_ids(mask)).logits
        rec.remove()
    with torch.no_grad():   # pad positions are left alone (only real prompt tokens are shifted)
        plain = latent.capture(model, b, [0])[0][0]
    pads = ~mask.bool()
    assert pads.any()
    torch.testing.assert_close(seen[0][pads], plain[pads], rtol=0, atol=0)
    torch.testing.assert_close(seen[0][~pads], (plain + shifts[:, None])[~pads], rtol=1e-5, atol=1e-5)
    for i, p in enumerate(PROMPTS):
        ids = tok([p], return_tensors="pt")["input_ids"]
        hook = _TokenHook(lambda t, v, s=shifts[i]: v + s)
        h = _block(model, 0, "block").register_forward_hook(hook)
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0]
        h.remove()
        real = mask[i].bool()
        torch.testing.assert_close(got[i][real], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["prompt_only", "gen_only", "prompt_and_gen"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_generate_strategies_match_no_cache_reference(strategy, arch):
    model, tok = tiny_model(arch, seed=3)
    b = _batch(tok)
    s = 1.5 * torch.randn(64)
    steps = 4
    with latent.inject(model, add={1: s}, strategy=strategy):
        out = model.generate(**b, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)[:, -steps:]
    for i, p in enumerate(PROMPTS):
        ids = tok([p], return_tensors="pt")["input_ids"]
        n = ids.shape[1]

        def fn(t, v):
            gen = t >= n
            on = (strategy != "gen_only" and not gen) or (strategy != "prompt_only" and gen)
            return v + s if on else v
        ref = _greedy_no_cache(model, ids, steps, [(_block(model, 1, "block"), _TokenHook(fn))])
        assert out[i].tolist() == ref.tolist(), (strategy, i)


def test_inject_removes_hooks_and_validates():
    model, tok = tiny_model("llama")
    b = _batch(tok)
    with torch.no_grad():
        base = model(**b).logits
        with pytest.raises(RuntimeError, match="boom"):
            with latent.inject(model, add={0: torch.randn(64)}):
                raise RuntimeError("boom")
        torch.testing.assert_close(model(**b).logits, base, rtol=0, atol=0)
        assert not model._forward_pre_hooks and not model.model.layers[0]._forward_hooks
    with pytest.raises(ValueError, match="strategy"):
        with latent.inject(model, add={0: torch.randn(64)}, strategy="always"):
            pass
    with pytest.raises(ValueError, match=r"add\[0\]"):
        with latent.inject(model, add={0: torch.randn(63)}):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with latent.inject(model, add={5: torch.randn(64)}):
            pass
    with pytest.raises(ValueError, match="site"):
        with latent.inject(model, add={0: torch.randn(64)}, site="attn"):
            pass


# ---- INCLINE ------------------------------------------------------------------------------------
def _incline_reference(model, tok, inc, sigma, steps):
    """Per sample, unpadded: clean pass with per-token capture, then the overwrite at the last prompt
    token in every layer, decoding without a cache."""
    outs = []
    L = len(model.model.layers)
    for p in PROMPTS:
        ids = tok([p], return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        clean = {}
        hooks = []
        for l in range(L):
            def grab(t, v, l=l):
                if t == n - 1:
                    clean[l] = v.clone()
                return v
            hooks.append((_block(model, l, inc.site), _TokenHook(grab)))
        _greedy_no_cache(model, ids, 1, hooks)
        tgt = {l: clean[l] + sigma * (clean[l] @ inc.W[l]) for l in range(L)}
        hooks = [(_block(model, l, inc.site), _TokenHook(lambda t, v, l=l: tgt[l] if t == n - 1 else v))
                 for l in range(L)]
        outs.append(_greedy_no_cache(model, ids, steps, hooks).tolist())
    return outs


@pytest.mark.parametrize("site,arch", [("block", "llama"), ("mlp", "gemma3"), ("block", "olmo2")])
def test_incline_matches_reference(site, arch):
    from xlkernels.analysis.data import parallel_corpus
    model, tok = tiny_model(arch, seed=1)
    c = parallel_corpus(["en", "de"], n=24)
    inc = INCLINE.fit(model, tok, c["de"], c["en"], site=site)
    assert inc.W.shape == (2, 64, 64)
    b = _batch(tok)
    steps = 3
    got = inc.generate(model, b, 0.7, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)[:, -steps:]
    assert got.tolist() == _incline_reference(model, tok, inc, 0.7, steps)
    # sigma = 0 is the clean model
    plain = model.generate(**b, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)[:, -steps:]
    zero = inc.generate(model, b, 0.0, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)[:, -steps:]
    assert zero.tolist() == plain.tolist()


def test_incline_lstsq_recovers_map(tmp_path):
    L, N, D = 2, 40, 8
    X = torch.randn(L, N, D, dtype=torch.float64)
    W = torch.randn(L, D, D, dtype=torch.float64)
    inc = INCLINE.fit_features(X, X @ W, site="mlp", src="de")
    torch.testing.assert_close(inc.W.double(), W, rtol=1e-4, atol=1e-4)
    inc.save(tmp_path / "inc.safetensors")
    back = INCLINE.load(tmp_path / "inc.safetensors")
    assert back.site == "mlp" and back.src == "de" and torch.equal(back.W, inc.W)
    with pytest.raises(ValueError, match="X_src"):
        INCLINE.fit_features(X, X[:, :5])


def test_select_sigma():
    assert len(SIGMA_GRID) == 21 and SIGMA_GRID[0] == -1.0 and SIGMA_GRID[10] == 0.0
    best, scores = select_sigma(lambda s: -(s - 0.3) ** 2)
    assert best == pytest.approx(0.3) and len(scores) == 21


# ---- ITLC ---------------------------------------------------------------------------------------
def _clusters(K=4, per=60, D=12, sep=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = sep * torch.randn(K, D, generator=g, dtype=torch.float64)
    A = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.5   # correlated noise
    X = torch.cat([centers[k] + torch.randn(per, D, generator=g, dtype=torch.float64) @ A for k in range(K)])
    y = torch.arange(K).repeat_interleave(per)
    return X, y


def test_lda_whitens_within_and_orders_between():
    X, y = _clusters()
    K = 4
    lda = lda_fit(X, y, K)
    assert lda["scalings"].shape == (12, K - 1)
    Z = (X - lda["xbar"]) @ lda["scalings"]
    means = torch.stack([Z[y == k].mean(0) for k in range(K)])
    Zc = Z - means[y]
    within = Zc.T @ Zc / (len(X) - K)
    torch.testing.assert_close(within, torch.eye(K - 1, dtype=torch.float64), rtol=0, atol=1e-8)
    between = (means - Z.mean(0)).T @ (means - Z.mean(0))
    off = between - torch.diag(torch.diagonal(between))
    assert off.abs().max() < 1e-8 * between.abs().max()
    d = torch.diagonal(between)
    assert (d[:-1] >= d[1:]).all()
    # the generalized eigenvalues of Sw^-1 Sb (brute force) match the between variances per dim
    Xc = X - torch.stack([X[y == k].mean(0) for k in range(K)])[y]
    Sw = Xc.T @ Xc / (len(X) - K)
    mu = torch.stack([X[y == k].mean(0) for k in range(K)])
    Sb = (mu - X.mean(0)).T @ (mu - X.mean(0))
    ev = torch.linalg.eigvals(torch.linalg.solve(Sw, Sb)).real.sort(descending=True).values[:K - 1]
    torch.testing.assert_close(d, ev, rtol=1e-6, atol=1e-8)


def test_itlc_probe_separates_languages(tmp_path):
    X, y = _clusters(K=5, per=80, D=16, sep=3.0, seed=2)
    it = ITLC.fit_features(X, y, ["en", "de", "fr", "ja", "ar"], layer=3, epochs=60, lr=1e-2)
    assert it.accuracy > 0.95
    assert (it.predict(X) == y).float().mean() > 0.95
    # vectors: class means of the LDA features on the active dims only
    Z = it.transform(X)
    assert it.vectors.shape == (5, 4) and it.active.dtype == torch.bool
    assert torch.all(it.vectors[~it.active] == 0)
    torch.testing.assert_close(it.back, it.vectors @ torch.linalg.pinv(it.scalings))
    s = it.shift("de", "en", alpha=0.5)
    torch.testing.assert_close(s, (0.5 * (it.back[1] - it.back[0])).float())
    torch.testing.assert_close(it.shift("ja", alpha=2.0), (2.0 * it.back[3]).float())
    torch.testing.assert_close(it.shift("ja", unscale=True, alpha=1.0), (it.back[3] * it.std).float())
    assert it.shift(["de", "fr"], "en").shape == (2, 16)
    it.save(tmp_path / "itlc.safetensors")
    back = ITLC.load(tmp_path / "itlc.safetensors")
    assert back.langs == it.langs and back.layer == 3 and back.accuracy == it.accuracy
    torch.testing.assert_close(back.shift("de", "en"), s)
    assert Z.shape == (400, 4)
    with pytest.raises(ValueError, match="'xx'"):
        it.shift("xx")


def test_itlc_fit_and_inject_on_tiny_model():
    from xlkernels.analysis.data import parallel_corpus
    model, tok = tiny_model("qwen3", seed=2)
    c = parallel_corpus(["en", "de", "ja"], n=30)
    it = ITLC.fit(model, tok, c, epochs=30, lr=1e-2)
    assert it.layer == 1 and it.back.shape == (3, 64)
    assert 0.0 <= it.accuracy <= 1.0
    b = _batch(tok)
    s = it.shift("ja", "en", alpha=4.0)
    steps = 3
    with it.inject(model, "ja", "en", alpha=4.0):
        got = model.generate(**b, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)[:, -steps:]
    for i, p in enumerate(PROMPTS):   # same as the per-token reference at block layer-1
        ids = tok([p], return_tensors="pt")["input_ids"]
        ref = _greedy_no_cache(model, ids, steps, [(_block(model, 0, "block"), _TokenHook(lambda t, v: v + s))])
        assert got[i].tolist() == ref.tolist()
    with pytest.raises(ValueError, match="layer"):
        ITLC.fit(model, tok, c, layer=2)


@pytest.mark.model
def test_itlc_and_incline_on_real_model():
    from xlkernels.analysis.data import parallel_corpus
    from xlkernels.models import load_default
    model, tok = load_default(progress=False)
    c = parallel_corpus(["en", "de", "ja"], n=40)
    it = ITLC.fit(model, tok, c, epochs=40, lr=1e-2, batch_size=20)
    assert it.layer == 9 and it.back.shape == (3, 640)
    # 32 train sentences per language in 640 dims: LDA overfits, so held-out accuracy is modest
    # (measured 0.83; chance 0.33)
    assert it.accuracy >= 0.6
    X = torch.cat([embed(model, tok, c[l][:8], "mean", batch_size=8)[9] for l in c])
    assert (it.predict(X) == torch.arange(3).repeat_interleave(8)).float().mean() >= 0.6
    b = tok(["The weather today is"], return_tensors="pt")
    with it.inject(model, "de", "en", alpha=0.5):
        out = model.generate(**b, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == b["input_ids"].shape[1] + 4
    inc = INCLINE.fit(model, tok, c["de"][:16], c["en"][:16], batch_size=16)
    assert inc.W.shape == (18, 640, 640) and torch.isfinite(inc.W).all()
    out = inc.generate(model, b, 0.3, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == b["input_ids"].shape[1] + 4



@pytest.mark.parametrize("name", ["past_key_values", "cache", "kv_cache_renamed"])
def test_prefill_is_read_from_the_cache_whatever_its_keyword(name):
    """transformers 5.24 renamed past_key_values to cache; the prefill flag must not depend on the name."""
    from transformers import DynamicCache
    model, tok = tiny_model("llama")
    ids = _batch(tok)["input_ids"]
    cache = DynamicCache(config=model.config)
    state = latent._State()
    hook = latent._pre_hook(state)
    hook(model, (), {"input_ids": ids, name: cache})
    assert state.prefill  # an empty cache: prefill
    kv = torch.randn(ids.shape[0], 2, ids.shape[1], 16)
    for layer in range(model.config.num_hidden_layers):
        cache.update(kv, kv, layer)
    hook(model, (), {"input_ids": ids[:, -1:], name: cache})
    assert not state.prefill
    hook(model, (ids[:, -1:], None, None, cache), {})  # passed by position
    assert not state.prefill
    hook(model, (ids[:, -1:],), {})
    assert state.prefill  # no cache at all: a plain forward counts as a prefill
