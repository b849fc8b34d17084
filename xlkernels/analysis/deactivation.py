"""LAPE's deactivation experiment (ppl.py): switch off one language's neurons in every layer's FFN
(act_fn(gate)[..., idx] = 0 at all positions, here through the fused GLU's intervention) and measure the mean
next-token NLL (log-PPL, what ppl.py prints) on each language's texts. The result is a K x K matrix: rows =
deactivated language, columns = evaluated language; `delta` is the change vs the unmodified model."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .neurons import _check_corpus, _input_device, _progress, _steerer, as_layer_dict, text_batches


def _token_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) float64 next-token NLL (0 where the target is padding); one row at a time to bound memory."""
    out = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float64, device=logits.device)
    for b in range(input_ids.shape[0]):
        nll = F.cross_entropy(logits[b, :-1].float(), input_ids[b, 1:].to(logits.device), reduction="none")
        out[b] = nll.double() * mask[b, 1:].to(logits.device)
    return out


@torch.no_grad()
def language_nll(model, tokenizer, corpus: dict, batch_size: int = 4, max_length: int = 128,
                 progress: bool = False, desc: str = "nll") -> torch.Tensor:
    """(K,) float64 mean next-token NLL per language over all predicted tokens of its texts (the first token of
    each text is not predicted). `model`: an HF causal LM (patched or not) or a Steerer (its current
    interventions apply)."""
    _check_corpus(corpus)
    model = getattr(model, "model", model) if hasattr(model, "record_neurons") else model
    dev = _input_device(model)
    K = len(corpus)
    total = torch.zeros(K, dtype=torch.float64)
    count = torch.zeros(K, dtype=torch.float64)
    n = -(-sum(len(t) for t in corpus.values()) // batch_size)
    for input_ids, mask, groups in _progress(text_batches(tokenizer, corpus, batch_size, max_length), n, desc,
                                              progress):
        logits = model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
        nll = _token_nll(logits, input_ids, mask).cpu()
        tgt = groups[:, 1:].clamp_min(0)
        valid = (groups[:, 1:] >= 0).double()
        total.index_add_(0, tgt.flatten(), nll.flatten())
        count.index_add_(0, tgt.flatten(), valid.flatten())
    if (count == 0).any():
        bad = [lang for lang, c in zip(corpus, count.tolist()) if c == 0]
        raise ValueError(f"corpus has no predicted token for {bad} (texts of one token or less)")
    return total / count


def _clear(steerer):
    for layer in range(steerer.num_layers):
        steerer.set_neuron_intervention(layer, None)


@torch.no_grad()
def deactivation_matrix(steerer_or_model, tokenizer, corpus: dict, neuron_sets, batch_size: int = 4,
                        max_length: int = 128, progress: bool = True) -> dict:
    """LAPE's PPL experiment. `neuron_sets`: {language: list[L] LongTensor} or list[K] of list[L] (then keyed by
    the corpus languages). Returns {"langs_off", "langs_eval", "base" (K_eval,), "loss" (K_off, K_eval),
    "delta" = loss - base}. Neuron interventions are cleared afterwards."""
    _check_corpus(corpus)
    if not isinstance(neuron_sets, dict):
        if len(neuron_sets) != len(corpus):
            raise ValueError(f"neuron_sets has {len(neuron_sets)} languages but corpus has {len(corpus)}")
        neuron_sets = dict(zip(corpus, neuron_sets))
    steerer = _steerer(steerer_or_model)
    for lang, per_l in neuron_sets.items():
        if len(per_l) != steerer.num_layers:
            raise ValueError(f"neuron_sets[{lang!r}] has {len(per_l)} layers, the model has {steerer.num_layers}")
    _clear(steerer)
    base = language_nll(steerer.model, tokenizer, corpus, batch_size, max_length, progress, "nll (base)")
    rows = []
    try:
        for lang, per_l in neuron_sets.items():
            _clear(steerer)
            layers = as_layer_dict(per_l)
            if layers:
                steerer.deactivate_neurons(layers)
            rows.append(language_nll(steerer.model, tokenizer, corpus, batch_size, max_length, progress,
                                     f"nll (-{lang})"))
    finally:
        _clear(steerer)
    loss = torch.stack(rows)
    return {"langs_off": list(neuron_sets), "langs_eval": list(corpus), "base": base, "loss": loss,
            "delta": loss - base.unsqueeze(0)}


def format_matrix(result: dict, key: str = "delta") -> str:
    """The matrix as a small text table (rows: deactivated language, columns: evaluated language)."""
    m = result[key]
    cols = result["langs_eval"]
    corner = "off \\ eval"
    lines = [f"{corner:>10} " + " ".join(f"{c:>7}" for c in cols)]
    for lang, row in zip(result["langs_off"], m.tolist()):
        lines.append(f"{lang:>10} " + " ".join(f"{v:+7.3f}" if key == "delta" else f"{v:7.3f}" for v in row))
    return "\n".join(lines)
