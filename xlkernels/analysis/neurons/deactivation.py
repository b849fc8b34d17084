"""LAPE's deactivation experiment (ppl.py): switch off one language's neurons in every layer's FFN
(act_fn(gate)[..., idx] = 0 at all positions, here through the fused GLU's intervention) and measure the mean
next-token NLL (log-PPL, what ppl.py prints) on each language's texts. The result is a K x K matrix: rows =
deactivated language, columns = evaluated language; `delta` is the change vs the unmodified model."""
from __future__ import annotations

import torch

from ..tokens import sequence_nll, token_budget
from .stats import _check_corpus, _input_device, _pad_id, _steerer
from .select import as_layer_dict


def _encode(tokenizer, corpus: dict, max_length: int):
    """(token id lists of all texts, their language ids) in corpus order, truncated to max_length."""
    seqs, langs = [], []
    for k, texts in enumerate(corpus.values()):
        for t in texts:
            seqs.append(list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]))
            langs.append(k)
    return seqs, torch.tensor(langs, dtype=torch.long)


def _mean_per_language(corpus, sums, counts, langs) -> torch.Tensor:
    K = len(corpus)
    total = torch.zeros(K, dtype=torch.float64).index_add_(0, langs, sums)
    count = torch.zeros(K, dtype=torch.float64).index_add_(0, langs, counts.double())
    if (count == 0).any():
        bad = [lang for lang, c in zip(corpus, count.tolist()) if c == 0]
        raise ValueError(f"corpus has no predicted token for {bad} (texts of one token or less)")
    return total / count


def _nll(model, tokenizer, corpus, encoded, budget, progress, desc):
    seqs, langs = encoded
    sums, counts = sequence_nll(model, seqs, _pad_id(tokenizer), None, budget, progress=progress, desc=desc)
    return _mean_per_language(corpus, sums, counts, langs)


def _check_batching(batch_size, max_length, max_tokens):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")


@torch.no_grad()
def language_nll(model, tokenizer, corpus: dict, batch_size: int = 4, max_length: int = 128,
                 progress: bool = False, desc: str = "nll", max_tokens: int | None = None) -> torch.Tensor:
    """(K,) float64 mean next-token NLL per language over all predicted tokens of its texts (the first token of
    each text is not predicted). `model`: an HF causal LM (patched or not) or a Steerer (its current
    interventions apply).

    Batching: texts sorted by length share a batch up to a padded-token budget (tokens.token_budget:
    `max_tokens`, else batch_size x max_length, on a CPU at most 512), so short texts fill a batch and little
    padding is computed; the LM head runs in chunks on the predicted positions only (tokens.sequence_nll), no
    (B, T, V) logits."""
    _check_corpus(corpus)
    _check_batching(batch_size, max_length, max_tokens)
    model = model.model if hasattr(model, "record_neurons") else model
    budget = token_budget(batch_size, max_length, max_tokens, _input_device(model))
    return _nll(model, tokenizer, corpus, _encode(tokenizer, corpus, max_length), budget, progress, desc)


def _clear(steerer):
    for layer in range(steerer.num_layers):
        steerer.set_neuron_intervention(layer, None)


@torch.no_grad()
def deactivation_matrix(steerer_or_model, tokenizer, corpus: dict, neuron_sets, batch_size: int = 4,
                        max_length: int = 128, progress: bool = True, max_tokens: int | None = None) -> dict:
    """LAPE's PPL experiment. `neuron_sets`: {language: list[L] LongTensor} or list[K] of list[L] (then keyed by
    the corpus languages). Returns {"langs_off", "langs_eval", "base" (K_eval,), "loss" (K_off, K_eval),
    "delta" = loss - base}. Neuron interventions are cleared afterwards. The texts are tokenized once;
    batching as in `language_nll`."""
    _check_corpus(corpus)
    _check_batching(batch_size, max_length, max_tokens)
    if not isinstance(neuron_sets, dict):
        if len(neuron_sets) != len(corpus):
            raise ValueError(f"neuron_sets has {len(neuron_sets)} languages but corpus has {len(corpus)}")
        neuron_sets = dict(zip(corpus, neuron_sets))
    steerer = _steerer(steerer_or_model)
    for lang, per_l in neuron_sets.items():
        if len(per_l) != steerer.num_layers:
            raise ValueError(f"neuron_sets[{lang!r}] has {len(per_l)} layers, the model has {steerer.num_layers}")
    _clear(steerer)
    encoded = _encode(tokenizer, corpus, max_length)
    budget = token_budget(batch_size, max_length, max_tokens, _input_device(steerer.model))
    base = _nll(steerer.model, tokenizer, corpus, encoded, budget, progress, "nll (base)")
    rows = []
    try:
        for lang, per_l in neuron_sets.items():
            _clear(steerer)
            layers = as_layer_dict(per_l)
            if layers:
                steerer.deactivate_neurons(layers)
            rows.append(_nll(steerer.model, tokenizer, corpus, encoded, budget, progress, f"nll (-{lang})"))
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
