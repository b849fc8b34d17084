"""LAHIS head-mask rows beyond the loss ablation: off-target output when a language's heads are masked, and
the soft mask (a few trained head gates) against gates trained on random heads."""
from __future__ import annotations

import contextlib

import torch

from . import claims, tasks
from .controls import random_heads, round_robin
from .intervals import parallel_clusters
from ..evaluation import langid

LIU = "Liu et al. 2025 (LAHIS)"


def gate_of(steerer, heads, value: float = 0.0) -> torch.Tensor:
    """(L, H) ones with `value` at the flat head ids."""
    g = torch.ones(steerer.num_layers * steerer.num_heads, device=steerer.gate.device)
    g[list(heads)] = value
    return g.view(steerer.num_layers, steerer.num_heads)


def _gated(steerer, gate):
    @contextlib.contextmanager
    def ctx(batch):
        steerer.gate = gate
        try:
            yield {}
        finally:
            steerer.reset()
    return ctx


def offtarget_row(steerer, tok, test, chosen, exclude, cfg):
    """On each language's own prompts: the share of outputs identified as another language with its specific
    heads masked, beside random heads in the same layers and the unmasked model. chosen / exclude
    {lang: flat head ids}."""
    from .steer import prompts_of
    langs = list(chosen)
    L, H = steerer.num_layers, steerer.num_heads
    n, seeds = cfg["n_offtarget"], cfg["seeds"]

    def cell(x, gate, idx):
        steerer.reset()
        texts, _ = tasks.generate_cell(steerer, tok, prompts_of([test[x][i] for i in idx]),
                                       _gated(steerer, gate) if gate is not None else None, cfg["new_tokens"])
        return tasks.outside(langid.label(texts, langs), x), texts
    base, own, ctrl, examples = [], [], [], {}
    for x in langs:
        m = min(n, len(test[x]))
        base.append(cell(x, None, range(m))[0])
        ok, texts = cell(x, gate_of(steerer, chosen[x]), range(m))
        own.append(ok)
        examples[x] = texts[:2]
        c = torch.zeros(m, dtype=torch.bool)
        for s, idx in enumerate(round_robin(m, seeds)):
            if idx:
                c[idx] = cell(x, gate_of(steerer, random_heads(chosen[x], L, H, s, exclude=exclude[x])), idx)[0]
        ctrl.append(c)
    own = torch.cat(own)
    nan = torch.full((len(own),), float("nan"))
    row = claims.steering("LAHIS: masking a language's heads sends its prompts off-target",
                          "masking language X's specific heads raises off-target (not X) output on X prompts "
                          "(Liu et al. 2025, XL-Sum with fastText LID)", own, torch.cat(ctrl)[None], torch.cat(base),
                          nan, nan, min_rate=None, max_cost=None, seeds=seeds,
                          setting=f"{len(chosen[langs[0]])} heads masked per language",
                          departures=f"{n} GNOME Help paragraph prompts per language ({', '.join(langs)}), "
                          f"{cfg['new_tokens']} greedy tokens, langid.py (the paper: XL-Sum, fastText, 80 tokens)",
                          what="outputs identified as another language", extra={"examples": examples},
                          clusters=parallel_clusters(len(langs), m))
    row["control"] = f"random heads in the same layers masked, {seeds} seeds (prompt i under seed i mod S)"
    return row


def qa_pairs(split, lang, pivot="en"):
    """(prompt, answer) pairs: translate the pivot paragraph into `lang`; the answer is the `lang` paragraph."""
    name, src = tasks.NAMES.get(lang, lang), tasks.NAMES.get(pivot, pivot)
    return [(f"{src}: {a}\n{name}:", " " + b) for a, b in zip(split[pivot], split[lang])]


def answer_nll(steerer, tok, pairs, gate) -> torch.Tensor:
    """(n,) mean NLL of each pair's answer tokens with steerer.gate = gate."""
    steerer.reset()
    steerer.gate = gate.to(steerer.gate.device)
    try:
        s, c = tasks.continuation_nll(steerer.model, tok, [p for p, _ in pairs], [a for _, a in pairs], batch=8)
    finally:
        steerer.reset()
    return s / c.clamp_min(1)


def soft_mask_row(steerer, tok, fit, test, cfg, scores, lang):
    """Train the gates of `lang`'s top-k LAHIS heads on translation pairs from fit; held-out answer NLL on test
    against gates trained the same way on random heads in the same layers."""
    from ..heads.lahis import top_k_heads
    from ..heads.soft_mask import default_k, train_soft_mask
    L, H = steerer.num_layers, steerer.num_heads
    k = default_k(L, H)
    train = qa_pairs(fit, lang)[:cfg["mask_train"]]
    held = qa_pairs(test, lang)[:cfg["n_nll"]]
    heads = top_k_heads(scores, k)

    done = {}

    def trained(ids):
        """(mask, held-out NLL) of gates trained on `ids`; training is deterministic, so a head set drawn
        twice is trained once."""
        key = tuple(sorted(ids))
        if key not in done:
            steerer.reset()
            m = train_soft_mask(steerer, tok, train, heads=list(key), epochs=cfg["mask_epochs"], lr=cfg["mask_lr"],
                                batch_size=cfg["mask_batch"], max_length=2 * cfg["max_length"])
            done[key] = (m, answer_nll(steerer, tok, held, m.gate))
        return done[key]
    mask, after = trained(heads)
    base = answer_nll(steerer, tok, held, torch.ones(L, H))
    ctrl = torch.stack([trained(random_heads(heads, L, H, s))[1] for s in range(cfg["mask_seeds"])])
    steps = cfg["mask_epochs"] * -(-len(train) // cfg["mask_batch"])
    row = claims.loss_drop("Soft head mask: a few trained head gates help held-out QA",
                           "training the gates of the top 2% LAHIS heads (~20 parameters) improves held-out QA "
                           "(Liu et al. 2025)", base, after, ctrl, setting=f"{k} gate(s) on {lang}",
                           departures=f"QA = translating held-out GNOME Help paragraphs en -> {lang}, scored by "
                           f"answer NLL (the paper: XQuAD accuracy); {len(train)} training pairs, {steps} AdamW steps "
                           f"at lr {cfg['mask_lr']:g} (the paper: 200 examples, 400 steps at 1e-2); k = 2% of "
                           f"{L * H} heads")
    row["details"].update(heads=[f"{h // H}.{h % H}" for h in heads], values=mask.values.tolist(),
                          train_losses=mask.losses, trainings=len(done))
    row["control"] = f"gates trained the same way on random heads in the same layers, {cfg['mask_seeds']} seeds"
    return row
