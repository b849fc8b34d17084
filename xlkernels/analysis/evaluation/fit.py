"""One steering plan per method, fitted on a parallel corpus, for the evaluation harness (`xlkernels eval --fit`)."""
from __future__ import annotations

import torch

from ..neurons.forcing import NeuronForcing
from .generation import steerer_of


FIT_METHODS = ("lape", "deactivate", "claim", "lahis", "itlc", "incline")


def fit_plans(model, tokenizer, corpus: dict, source: str, target: str, methods=FIT_METHODS, *,
              batch_size: int = 16, max_length: int = 48, claim: dict | None = None, lahis_texts: int = 12,
              layer: int | None = None, progress: bool = False) -> dict:
    """One plan per method, fitted on `corpus` ({lang: parallel texts}, holding source and target; more
    languages sharpen LAPE and the CLAIM probes), steering source -> target:
    - "lape": NeuronForcing: the source's LAPE neurons off, the target's set to their mean target activation;
    - "deactivate": SteeringPlan with the source's LAPE neurons off (no strength);
    - "claim": SteeringPlan with a CLAIM shift bank, pivot = source; `claim` = keyword arguments for
      shift.shift_bank plus "position" (default {"position": "last"}; select "importance" uses LAHIS scores);
    - "lahis": SteeringPlan gate: the target's language-specific LAHIS heads at 2, the source's at 0;
    - "itlc": SteeringPlan with ITLC language vectors at hidden_states[layer] (default L // 2), alpha 1;
    - "incline": SteeringPlan with INCLINE maps fitted from the source's to the target's representations
      (the paper maps a language to English), sigma 0.3.
    Use held-out prompts for evaluate(). Returns {method: plan} in `methods` order."""
    from .. import heads as hd
    from .. import neurons as N
    from ..steering import shift as sh
    from ..steering.plan import SteeringPlan, model_meta
    bad = [m for m in methods if m not in FIT_METHODS]
    if bad:
        raise ValueError(f"methods {bad} are not among {FIT_METHODS}")
    for name, x in (("source", source), ("target", target)):
        if x not in corpus:
            raise ValueError(f"{name} {x!r} is not a language of the corpus {list(corpus)}")
    if source == target:
        raise ValueError(f"source and target must differ, got {source!r}")
    steerer, hf = steerer_of(model)
    steerer.reset()
    meta = model_meta(steerer)
    langs = list(corpus)
    s, k = langs.index(source), langs.index(target)
    plans, scores = {}, None
    if {"lape", "deactivate"} & set(methods):
        stats = N.collect_stats(steerer, tokenizer, corpus, batch_size=batch_size, max_length=max_length,
                                progress=progress)
        res = N.lape(N.activation_probs(stats))
        mean = stats.mean()
        L = steerer.num_layers
        off = {l: res.neurons[s][l].long() for l in range(L) if len(res.neurons[s][l])}
        on = {l: res.neurons[k][l].long() for l in range(L) if len(res.neurons[k][l])}
        if "lape" in methods:
            plans["lape"] = NeuronForcing(off, on, {l: mean[l, k, i].float().cpu() for l, i in on.items()},
                                          meta=dict(meta, method="lape", source=source, target=target))
        if "deactivate" in methods:
            plans["deactivate"] = SteeringPlan(neurons=off, meta=dict(meta, method="lape-deactivate"))
    if "lahis" in methods or (claim or {}).get("select") == "importance":
        texts = {x: corpus[x][:lahis_texts] for x in (source, target)}
        scores = {x: hd.lahis_scores(steerer, tokenizer, t, batch_size=lahis_texts, max_length=32,
                                     progress=progress) for x, t in texts.items()}
    if "claim" in methods:
        kw = dict(claim or {})
        pos = kw.pop("position", "last")
        if kw.get("select") == "importance":
            kw.setdefault("importance", {x: scores.get(x, torch.zeros(steerer.num_layers, steerer.num_heads))
                                         for x in langs})
            for x in langs:
                if x not in kw["importance"]:
                    kw["importance"][x] = torch.zeros(steerer.num_layers, steerer.num_heads)
        kw.setdefault("pivot", source)
        outs = {x: sh.head_outputs(steerer, tokenizer, t, position=pos, batch_size=batch_size,
                                   max_length=max_length, progress=progress) for x, t in corpus.items()}
        bank = sh.shift_bank(outs, **kw)
        plans["claim"] = SteeringPlan(shift=bank.bank, alpha=4.0, languages=bank.languages,
                                      meta=dict(meta, method="claim", position=pos))
    if "lahis" in methods:
        sets = hd.head_sets(scores, min_rep=2)
        H = steerer.num_heads
        gate = torch.ones(steerer.num_layers, H)
        for i in sets["specific"][target]:
            gate[i // H, i % H] = 2.0
        for i in sets["specific"][source]:
            gate[i // H, i % H] = 0.0
        plans["lahis"] = SteeringPlan(gate=gate, meta=dict(meta, method="lahis-gate"))
    if "itlc" in methods:
        from ..steering.itlc import ITLC
        L = steerer.num_layers
        it = ITLC.fit(hf, tokenizer, corpus, layer=L // 2 if layer is None else layer, batch_size=batch_size,
                      max_length=max_length)
        plans["itlc"] = SteeringPlan(itlc=it, itlc_alpha=1.0, meta=dict(meta, method="itlc"))
    if "incline" in methods:
        from ..steering.incline import INCLINE
        inc = INCLINE.fit(hf, tokenizer, corpus[source], corpus[target], n=len(corpus[source]),
                          batch_size=batch_size, max_length=max_length, src=source)
        plans["incline"] = SteeringPlan(incline=inc, sigma=0.3, meta=dict(meta, method="incline"))
    steerer.reset()
    return {m: plans[m] for m in methods}
