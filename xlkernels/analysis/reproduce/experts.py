"""Finding experts (Suau et al.'s ml-selfcond, used by Sundar et al. 2025, methods.md 8): a unit's expertise
for a language is the average precision (AP) of its response, ranking that language's sentences above the
others'. The row forces English's top-AP FFN neurons to their median English response on the other
languages' inputs and asks whether translation retrieval into English improves, against random neurons in
the same layers forced to their own median English response."""
from __future__ import annotations

import torch

from . import claims
from .controls import random_neurons, round_robin
from .intervals import parallel_clusters


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(U,) AP of each column of `scores` (N, U) as a ranking of the rows where `labels` (N,) is True
    (sklearn's average_precision_score when the scores have no ties)."""
    labels = torch.as_tensor(labels, dtype=torch.bool)
    if scores.dim() != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (N, U) and labels (N,), got {tuple(scores.shape)}, {tuple(labels.shape)}")
    if not labels.any():
        raise ValueError("labels has no positive")
    order = scores.argsort(dim=0, descending=True, stable=True)
    pos = labels[order].double()
    prec = pos.cumsum(0) / torch.arange(1, len(labels) + 1, dtype=torch.float64)[:, None]
    return (prec * pos).sum(0) / pos.sum(0)


@torch.no_grad()
def sentence_activations(steerer, tok, texts, batch_size: int = 16, max_length: int = 96) -> torch.Tensor:
    """(n, L, I) float32: each text's mean FFN activation over its tokens (BOS not counted)."""
    from ..align import _no_logits
    from ..tokens import pad_id_of, pad_right
    dev = steerer.model.get_input_embeddings().weight.device
    out = []
    for s in range(0, len(texts), batch_size):
        rows = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts[s:s + batch_size]]
        ids, mask = pad_right(rows, pad_id_of(tok), dev)
        groups = torch.where(mask.bool(), torch.arange(len(rows), device=dev)[:, None], -1)
        if tok.bos_token_id is not None:
            groups[:, 0] = torch.where(ids[:, 0] == tok.bos_token_id, -1, groups[:, 0])
        with steerer.record_neurons(groups, len(rows)) as st:
            steerer.model(input_ids=ids, attention_mask=mask, use_cache=False, **_no_logits(steerer.model))
        out.append(st.mean().nan_to_num(0.0).float().transpose(0, 1).cpu())
    return torch.cat(out)


def retrieval_hits(E_en: torch.Tensor, E_x: torch.Tensor, idx=None) -> torch.Tensor:
    """(m,) float64: per sentence of language x, the share of layers at which its cosine nearest neighbour
    among the English sentences is its translation. E_en (L, n, D); E_x (L, m, D), the x sentences idx
    (default all n, aligned with E_en)."""
    idx = torch.arange(E_en.shape[1]) if idx is None else torch.as_tensor(list(idx))
    a = E_en.double() / E_en.double().norm(dim=-1, keepdim=True).clamp_min(1e-30)
    b = E_x.double() / E_x.double().norm(dim=-1, keepdim=True).clamp_min(1e-30)
    C = b @ a.transpose(-1, -2)
    return (C.argmax(-1) == idx).double().mean(0)


def expert_units(acts: dict, pivot: str, frac: float):
    """The top `frac` of all units by AP for `pivot` vs the other languages: ({layer: neuron ids}, AP of the
    chosen, median pivot response (L, I)). acts {lang: (n, L, I)}."""
    langs = list(acts)
    X = torch.cat([acts[x] for x in langs])
    L, I = X.shape[1:]
    y = torch.cat([torch.full((len(acts[x]),), x == pivot) for x in langs])
    ap = average_precision(X.flatten(1), y)
    k = max(1, int(frac * L * I))
    top = ap.topk(k).indices
    units = {}
    for u in sorted(top.tolist()):
        units.setdefault(u // I, []).append(u % I)
    med = acts[pivot].median(0).values
    return {l: torch.tensor(v, dtype=torch.long) for l, v in units.items()}, ap[top], med


def experts_row(steerer, tok, fit, test, cfg):
    from ..align import embed_many
    from ..neurons.forcing import NeuronForcing
    langs = [x for x in test if x != "en"]
    n_fit, n = cfg["n_experts"], cfg["n_nll"]
    acts = {x: sentence_activations(steerer, tok, t[:n_fit], max_length=cfg["max_length"]) for x, t in fit.items()}
    units, ap, med = expert_units(acts, "en", cfg["expert_frac"])
    I = steerer.num_neurons

    def embed(texts):
        return embed_many(steerer.model, tok, texts, ("mean",), 16, cfg["max_length"])["mean"]

    steerer.reset()
    E_en = embed(test["en"][:n])

    m = len(E_en[0])

    def hits(layers, idx=range(m)):
        steerer.reset()
        if layers:
            NeuronForcing({}, layers, {l: med[l, i] for l, i in layers.items()}).apply(steerer)
        try:
            return torch.cat([retrieval_hits(E_en, embed([test[x][i] for i in idx]), idx) for x in langs])
        finally:
            steerer.reset()
    base, forced = hits(None), hits(units)
    ctrl = torch.zeros(len(langs), m, dtype=torch.float64)
    for s, idx in enumerate(round_robin(m, cfg["seeds"])):
        if idx:
            ctrl[:, idx] = hits(random_neurons(units, I, s), idx).view(len(langs), len(idx))
    k = sum(len(v) for v in units.values())
    row = claims.choice_gain(
        "Finding experts: forcing English expert neurons aligns other languages with English",
        "forcing a language's expert units (top average precision) increases cross-lingual alignment and "
        "retrieval accuracy (Sundar et al. 2025; finding experts: Suau et al.)", base, forced, ctrl.flatten()[None],
        setting=f"{k} English expert neurons (top {cfg['expert_frac']:.1%} by AP) forced to their English median",
        departures=f"units are FFN neurons act(gate) (the papers: every Linear output); AP on {n_fit} fit "
        "paragraphs per language, mean over tokens; forced on other-language inputs at every position; "
        "retrieval = cosine nearest English neighbour of mean-pooled states, share of layers; which language's "
        "experts Sundar et al. force is not verified (here: English's)",
        task=f" (x -> en retrieval over {', '.join(langs)})", seeds=cfg["seeds"],
        clusters=parallel_clusters(len(langs), m))
    row["details"].update(units_per_layer={int(l): len(v) for l, v in units.items()},
                          ap=[float(ap.min()), float(ap.max())])
    row["control"] = (f"random neurons in the same layers forced to their own English median, {cfg['seeds']} seeds "
                      "(item i under seed i mod S)")
    return row
