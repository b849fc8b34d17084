"""Cross-lingual alignment metrics: MEXA (methods.md 7.1) and ANC (7.3), per layer.

Sentence embeddings come from `output_hidden_states` (L+1 entries: index 0 = embeddings, the last one
after the final norm, as in the MEXA code). Batches are padded (left or right, the tokenizer's choice)
with position ids counted over real tokens, so every sentence gets the same embedding as when run alone
(the MEXA reference runs batch 1); tests check this.
"""
import sys

import torch

POOLINGS = ("weighted", "last", "mean")


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool (..., B, T, D) states over non-pad tokens (mask (B,T), 1 = real) -> (..., B, D) float32.

    weighted: MEXA's position-weighted mean, w_t = t (1..T over real tokens): sum_t t h_t / sum_t t.
    last: the last real token. mean: plain mean over real tokens (ANC, ITLC, INCLINE).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    m = mask.to(torch.float32)
    if pooling == "weighted":
        w = torch.cumsum(m, dim=-1) * m
    elif pooling == "mean":
        w = m
    else:   # one-hot at the last real position (works for left and right padding)
        T = m.shape[-1]
        last = T - 1 - torch.argmax(torch.flip(m, dims=[-1]), dim=-1)
        w = torch.nn.functional.one_hot(last, T).to(torch.float32)
    w = w / w.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.einsum("...btd,bt->...bd", hidden.to(torch.float32), w.to(hidden.device))


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens (0 for pads), as generate() does for left padding."""
    return (torch.cumsum(mask.long(), -1) - 1).clamp_min(0)


def _no_logits(model):
    """Skip the LM head on all but one position (a 262k vocab head costs more than the layers)."""
    import inspect
    try:
        ok = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        ok = False
    return {"logits_to_keep": 1} if ok else {}


def _device(model):
    return next(model.parameters()).device


def _batches(tok, texts, batch_size, max_length):
    """Yield (indices, batch) with texts sorted by length (less padding); indices map back."""
    lengths = [len(ids) for ids in tok(list(texts), truncation=max_length is not None,
                                      max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                    truncation=max_length is not None, max_length=max_length)
        yield idx, batch


def _progress(total, desc, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="sent", file=sys.stderr, leave=False)


@torch.no_grad()
def embed_many(model, tok, texts, poolings=("weighted",), batch_size=8, max_length=512, progress=False,
               desc="embedding"):
    """{pooling: (L+1, n, D) float32 CPU} from one pass over `texts` (see `embed`)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("texts is empty")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    poolings = (poolings,) if isinstance(poolings, str) else tuple(poolings)
    for p in poolings:
        if p not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {p!r}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dev = _device(model)
    out = {p: None for p in poolings}
    bar = _progress(len(texts), desc, progress)
    for idx, batch in _batches(tok, texts, batch_size, max_length):
        mask = batch["attention_mask"].to(dev)
        res = model(input_ids=batch["input_ids"].to(dev), attention_mask=mask,
                    position_ids=position_ids(mask), output_hidden_states=True, use_cache=False,
                    **_no_logits(model))
        hs = torch.stack(res.hidden_states)   # (L+1, B, T, D)
        for p in poolings:
            e = pool(hs, mask, p).cpu()
            if out[p] is None:
                out[p] = torch.empty(e.shape[0], len(texts), e.shape[-1])
            out[p][:, idx] = e
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


def embed(model, tok, texts, pooling="weighted", batch_size=8, max_length=512, progress=False):
    """Sentence embeddings at every layer: (L+1, n, D) float32 on CPU.

    pooling: "weighted" (MEXA default, w_t = t), "last" (last real token) or "mean". Texts are batched
    (sorted by length) with padding; results equal batch-1 extraction up to float rounding.
    """
    return embed_many(model, tok, texts, (pooling,), batch_size, max_length, progress)[pooling]


def _as_2d_pair(a, b, name_a, name_b):
    for x, n in ((a, name_a), (b, name_b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3):
            raise ValueError(f"{n} must be (n, D) or (L, n, D), got shape {tuple(x.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return a.to(torch.float64), b.to(torch.float64)


def mexa_score(E_en: torch.Tensor, E_l: torch.Tensor):
    """MEXA alignment of parallel embeddings: the fraction of pairs i whose cosine C[i,i] is STRICTLY
    above every other entry of row i and of column i of C[i,j] = cos(E_en[i], E_l[j]).

    E_en, E_l: (n, D) -> float, or (L, n, D) -> (L,) float64 tensor (one score per layer). n >= 2.
    """
    a, b = _as_2d_pair(E_en, E_l, "E_en", "E_l")
    n = a.shape[-2]
    if n < 2:
        raise ValueError(f"MEXA needs at least 2 parallel sentences, got n={n}")
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    C = a @ b.transpose(-1, -2)
    diag = torch.diagonal(C, dim1=-2, dim2=-1)
    off = C.masked_fill(torch.eye(n, dtype=torch.bool, device=C.device), float("-inf"))
    ok = (diag > off.amax(dim=-1)) & (diag > off.amax(dim=-2))
    score = ok.to(torch.float64).mean(-1)
    return float(score) if score.dim() == 0 else score


def anc_score(X: torch.Tensor, Y: torch.Tensor):
    """ANC: mean over neurons j of the Pearson correlation of X[:, j] and Y[:, j] across sentences
    (center each neuron over sentences, then cosine). Constant neurons count as 0 correlation.

    X, Y: (n, D) -> float, or (L, n, D) -> (L,) float64 tensor. n >= 2.
    """
    x, y = _as_2d_pair(X, Y, "X", "Y")
    if x.shape[-2] < 2:
        raise ValueError(f"ANC needs at least 2 sentences, got n={x.shape[-2]}")
    x = x - x.mean(-2, keepdim=True)
    y = y - y.mean(-2, keepdim=True)
    den = x.norm(dim=-2) * y.norm(dim=-2)
    corr = torch.where(den > 0, (x * y).sum(-2) / den.clamp_min(1e-300), torch.zeros_like(den))
    score = corr.mean(-1)
    return float(score) if score.dim() == 0 else score


def _check_corpus(corpus, pivot, langs):
    if not isinstance(corpus, dict) or not corpus:
        raise ValueError("corpus must be a non-empty dict {lang: [texts]}")
    if pivot not in corpus:
        raise ValueError(f"pivot language {pivot!r} is not in the corpus (has {', '.join(corpus)})")
    langs = [l for l in corpus if l != pivot] if langs is None else list(langs)
    for l in langs:
        if l not in corpus:
            raise ValueError(f"language {l!r} is not in the corpus (has {', '.join(corpus)})")
    n = len(corpus[pivot])
    for l in langs:
        if len(corpus[l]) != n:
            raise ValueError(f"corpus is not aligned: {pivot!r} has {n} texts but {l!r} has {len(corpus[l])}")
    if n < 2:
        raise ValueError(f"corpus needs at least 2 parallel texts per language, got {n}")
    return langs


def mexa(model, tok, corpus, pivot="en", langs=None, poolings=("weighted", "last"), anc=True,
         batch_size=8, max_length=512, progress=False):
    """MEXA (and ANC) of each language against `pivot`, per layer, on a parallel corpus {lang: [texts]}.

    Returns a JSON-ready dict:
      num_layers (L+1 hidden states, index 0 = embeddings), n, pivot, langs, poolings,
      mexa[pooling][lang] = per-layer scores, mexa_mean / mexa_max[pooling][lang] = mean / max over
      layers (MEXA's "ARC style" / "Belebele style" aggregation), and with anc=True
      anc[lang] = per-layer ANC on mean-pooled states, anc_mean[lang].
    """
    langs = _check_corpus(corpus, pivot, langs)
    poolings = (poolings,) if isinstance(poolings, str) else tuple(poolings)
    need = tuple(dict.fromkeys(poolings + (("mean",) if anc else ())))
    emb = {}
    for l in [pivot] + langs:
        emb[l] = embed_many(model, tok, corpus[l], need, batch_size, max_length, progress, desc=f"embed {l}")
    out = {"pivot": pivot, "langs": langs, "n": len(corpus[pivot]), "poolings": list(poolings),
           "num_layers": int(emb[pivot][need[0]].shape[0]), "mexa": {}, "mexa_mean": {}, "mexa_max": {}}
    for p in poolings:
        out["mexa"][p], out["mexa_mean"][p], out["mexa_max"][p] = {}, {}, {}
        for l in langs:
            s = mexa_score(emb[pivot][p], emb[l][p])
            out["mexa"][p][l] = [float(v) for v in s]
            out["mexa_mean"][p][l] = float(s.mean())
            out["mexa_max"][p][l] = float(s.max())
    if anc:
        out["anc"], out["anc_mean"] = {}, {}
        for l in langs:
            s = anc_score(emb[pivot]["mean"], emb[l]["mean"])
            out["anc"][l] = [float(v) for v in s]
            out["anc_mean"][l] = float(s.mean())
    return out
