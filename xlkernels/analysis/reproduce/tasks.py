"""What the rows measure on the model: held-out NLL per text after a context paragraph, forced-choice
translation retrieval by likelihood, steered generation with strict language labels, fluency under the
target-language prompt, chrF."""
from __future__ import annotations

import contextlib
import random
from collections import Counter

import torch

from ..evaluation import langid
from ..tokens import pad_id_of, pad_right, token_nll

NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "ru": "Russian", "zh_Hans": "Chinese",
         "ja": "Japanese", "ar": "Arabic", "it": "Italian", "pt_BR": "Portuguese", "nl": "Dutch", "pl": "Polish"}


def _model(m):
    return m.model if hasattr(m, "record_neurons") else m


def _dev(model):
    return model.get_input_embeddings().weight.device


# ---------------------------------------------------------------------------------------------- NLL
@torch.no_grad()
def prefixed_nll(model, tok, texts, contexts, context: int = 64, max_tokens: int = 4096) -> torch.Tensor:
    """(n,) mean NLL per token of each text scored after its context: BOS, the last `context` tokens of
    contexts[i], a newline, then texts[i] (only its tokens are scored). Each text is its own row, so any subset
    of texts scores the same as in the whole set, and no scored token sits right after BOS. Rows are sorted by
    length and batched up to `max_tokens` padded tokens (a forward reads every weight once, so on a CPU few
    large batches beat many small ones)."""
    if len(texts) != len(contexts):
        raise ValueError(f"texts and contexts differ in length: {len(texts)} != {len(contexts)}")
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    model = _model(model)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    rows = []
    for t, c in zip(texts, contexts):
        a = bos + tok(c, add_special_tokens=False)["input_ids"][-context:] + nl
        rows.append((a, tok(t, add_special_tokens=False)["input_ids"]))
    out = torch.full((len(rows),), float("nan"), dtype=torch.float64)
    order = [i for i in sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1])) if rows[i][1]]
    batches, cur = [], []
    for i in order:     # ascending lengths: row i is the longest of its batch so far
        if cur and (len(cur) + 1) * (len(rows[i][0]) + len(rows[i][1])) > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches += [cur] if cur else []
    dev = _dev(model)
    for ids_ in batches:
        ids, mask = pad_right([rows[i][0] + rows[i][1] for i in ids_], pad_id_of(tok), dev)
        lab = torch.full_like(ids, -100)
        for r, i in enumerate(ids_):
            a, b = rows[i]
            lab[r, len(a):len(a) + len(b)] = torch.tensor(b)
        nll, valid = token_nll(model, ids, mask, lab)
        out[ids_] = (nll.double().sum(1) / valid.sum(1).clamp_min(1)).cpu()
    return out


# ---------------------------------------------------------------------------------------------- choices
@torch.no_grad()
def continuation_nll(model, tok, prompts, conts, batch: int = 16, before=None, positions: bool = False):
    """Per-pair (NLL sum, token count) of continuation `conts[i]` (text, or token ids) after `prompts[i]`.
    before(rows, batch) -> context manager entered around each forward (rows: the pair ids in the batch);
    with positions=True it also gets the batch's last prompt positions (B,) long."""
    model = _model(model)
    seqs = []
    for p, c in zip(prompts, conts):
        a = list(tok(p)["input_ids"])
        b = list(c) if not isinstance(c, str) else list(tok(c, add_special_tokens=False)["input_ids"])
        seqs.append((a, b))
    sums = torch.zeros(len(seqs), dtype=torch.float64)
    counts = torch.zeros(len(seqs), dtype=torch.long)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    dev = _dev(model)
    for s in range(0, len(order), batch):
        rows = [i for i in order[s:s + batch] if seqs[i][1]]
        if not rows:
            continue
        ids, mask = pad_right([seqs[i][0] + seqs[i][1] for i in rows], pad_id_of(tok), dev)
        lab = torch.full_like(ids, -100)
        for r, i in enumerate(rows):
            a, b = seqs[i]
            lab[r, len(a):len(a) + len(b)] = torch.tensor(b)
        last = torch.tensor([len(seqs[i][0]) - 1 for i in rows], dtype=torch.long, device=dev)
        ctx = contextlib.nullcontext() if before is None else (
            before(rows, {"input_ids": ids, "attention_mask": mask}, last) if positions else
            before(rows, {"input_ids": ids, "attention_mask": mask}))
        with ctx:
            nll, valid = token_nll(model, ids, mask, lab)
        sums[rows] = nll.double().sum(1).cpu()
        counts[rows] = valid.sum(1).cpu()
    return sums, counts


def retrieval_items(src: list, en: list, lang: str, seed: int = 0):
    """Forced-choice translation retrieval: item i = (prompt "<Lang>: src[i]\\nEnglish:", the true English
    sentence, a distractor = another item's English sentence of the nearest length). Balanced by design:
    every item has one right and one wrong answer. Returns (prompts, true, wrong)."""
    n = len(src)
    if n < 2 or len(en) != n:
        raise ValueError("retrieval needs >= 2 aligned pairs")
    rng = random.Random(seed)
    order = sorted(range(n), key=lambda i: (len(en[i]), rng.random()))
    wrong = [None] * n
    for k, i in enumerate(order):
        wrong[i] = en[order[k + 1 if k + 1 < n else k - 1]]
    prompts = [f"{NAMES.get(lang, lang)}: {s}\nEnglish:" for s in src]
    return prompts, [" " + e for e in en], [" " + w for w in wrong]


def choice_correct(model, tok, prompts, true, wrong, before=None, positions=False, batch=16) -> torch.Tensor:
    """(n,) bool: the true continuation has the lower mean NLL per token than the distractor."""
    n = len(prompts)
    s, c = continuation_nll(model, tok, list(prompts) * 2, list(true) + list(wrong), batch,
                            _twice(before, n) if before else None, positions)
    m = s / c.clamp_min(1)
    return m[:n] < m[n:]


def _twice(before, n):
    """Row ids of the doubled (true, wrong) list mapped back to item ids."""
    def wrap(rows, *a):
        return before([r % n for r in rows], *a)
    return wrap


# ---------------------------------------------------------------------------------------------- generation
def generate_cell(steerer, tok, prompts, steer=None, max_new_tokens: int = 24, batch: int = 16, sample=None):
    """Generations (texts, token ids) of `prompts` under steer(batch) (a context manager or None): greedy, or
    with `sample` (generate() keyword arguments such as do_sample, temperature) from torch seed 0."""
    from ..evaluation.generation import generate
    if sample:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            ids, _ = generate(steerer.model, tok, prompts, max_new_tokens, batch, steer, **sample)
    else:
        ids, _ = generate(steerer.model, tok, prompts, max_new_tokens, batch, steer)
    return [tok.decode(g, skip_special_tokens=True) for g in ids], ids


def success(labels, target) -> torch.Tensor:
    """(n,) bool: labelled as the target language (a degenerate or unknown output is a failure)."""
    return torch.tensor([x == target for x in labels], dtype=torch.bool)


def outside(labels, source) -> torch.Tensor:
    """(n,) bool: identified as a language other than `source` (degenerate and unknown are failures)."""
    return torch.tensor([x not in (source, langid.UNKNOWN, langid.DEGENERATE) for x in labels], dtype=torch.bool)


def fluency(steerer, tok, target_prompts, gen_ids, batch: int = 16):
    """Per-generation mean NLL of its tokens under the UNSTEERED model after the parallel target-language
    prompt (so a switch into the target language is not counted as disfluency); NaN for empty outputs."""
    with steerer.unsteered():
        s, c = continuation_nll(steerer.model, tok, target_prompts, gen_ids, batch)
    return torch.where(c > 0, s / c.clamp_min(1), torch.full_like(s, float("nan")))


# ---------------------------------------------------------------------------------------------- chrF
def chrf(hyp: str, ref: str, order: int = 6, beta: float = 2.0) -> float:
    """Sentence chrF (character n-grams 1..order, whitespace removed, beta 2: sacrebleu's chrF defaults), 0-100."""
    h, r = "".join(hyp.split()), "".join(ref.split())
    precs, recs = [], []
    for n in range(1, order + 1):
        hc = Counter(h[i:i + n] for i in range(len(h) - n + 1))
        rc = Counter(r[i:i + n] for i in range(len(r) - n + 1))
        if not hc or not rc:
            continue
        m = sum((hc & rc).values())
        precs.append(m / sum(hc.values()))
        recs.append(m / sum(rc.values()))
    if not precs:
        return 0.0
    p, rr = sum(precs) / len(precs), sum(recs) / len(recs)
    if p + rr == 0:
        return 0.0
    b2 = beta * beta
    return 100 * (1 + b2) * p * rr / (b2 * p + rr)
