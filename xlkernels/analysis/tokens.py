"""Token-level helpers shared by the methods: encoding, padding, length buckets and token budgets, and the
per-token NLL (vocabulary-blocked without gradients, so a 262k-word LM head never materialises full logits)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ---------------------------------------------------------------------------------------------- batching
def encode(tokenizer, texts, max_length: int = 256) -> list[list[int]]:
    """Token ids of each text (special tokens as the tokenizer adds them), truncated to max_length.
    Texts shorter than 2 tokens have no next-token loss and are dropped."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    out = []
    for t in texts:
        ids = tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
        ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
        if len(ids) >= 2:
            out.append(ids)
    return out


def pad_right(seqs, pad_id: int = 0, device="cpu"):
    """Right-pad id lists into (input_ids, attention_mask) LongTensors of shape (B, max len).

    Right padding keeps every real token's position and causal context the same as in a batch of one."""
    if not seqs:
        raise ValueError("seqs must not be empty")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


BATCH_OVERHEAD_TOKENS = 64   # per-batch cost in padded-token equivalents (fixed costs, small-GEMM inefficiency)
MAX_BATCH_SEQS = 256   # sequences per batch when batch_size is not given (bounds the search below)


def length_buckets(lengths, batch_size: int | None = None, max_tokens: int | None = None,
                   overhead: int = BATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices of `lengths` grouped into batches of similar length, so right padding costs little: sorted by
    length (stable), then cut into runs of at most `batch_size` sequences and at most `max_tokens` padded
    tokens (count x longest; a longer single sequence gets a batch of its own); batch_size None =
    MAX_BATCH_SEQS, max_tokens None = no limit. Within the
    limits the cuts minimise the padded tokens plus `overhead` per batch (exact dynamic programme over the
    sorted order), so a short tail is not padded to the longest sequence and tiny batches are avoided.
    Every index appears exactly once."""
    for name, v in (("batch_size", batch_size), ("max_tokens", max_tokens)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    lens = [max(1, int(lengths[i])) for i in order]
    n = len(lens)
    best, cut = [0] + [float("inf")] * n, [0] * (n + 1)
    for i in range(1, n + 1):              # last batch = sorted[j:i], padded to lens[i-1]
        L = lens[i - 1]
        cap = min(batch_size or MAX_BATCH_SEQS, (max_tokens // L if max_tokens else n) or 1, i)
        for j in range(i - 1, i - cap - 1, -1):
            c = best[j] + (i - j) * L + overhead
            if c < best[i]:
                best[i], cut[i] = c, j
    out, i = [], n
    while i > 0:
        out.append(order[cut[i]:i])
        i = cut[i]
    return out[::-1]


def pad_id_of(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def _head_parts(model):
    """(base model, lm_head, final logit softcap) of an HF causal LM, or None when it has no such split."""
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None or not callable(base):
        return None
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return base, head, getattr(cfg, "final_logit_softcapping", None) or None


def _chunk_nll(head, softcap, h, target):
    """NLL (n,) float32 of hidden rows h (n,E) against target (n,): lm_head, softcap, log-softmax."""
    logits = head(h)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), target, reduction="none")


VOCAB_BLOCK = 2048   # LM-head rows per block of the no-grad NLL (512 x 2048 fp32 logits = 4 MB stay in cache)
NOGRAD_CHUNK_TOKENS = 512   # tokens per no-grad chunk: measured best with VOCAB_BLOCK on one core (bench/NOTES.md)


def _blocked_nll(head, softcap, h, target, block: int | None = None):
    """No-grad NLL (n,) float32 as _chunk_nll, blocked over the vocabulary: `block` lm_head rows at a time,
    softcap per block, online logsumexp (running max in float32, sum of exp(z - max) in float64) and the
    target logit taken from the block that holds it. Never holds more than (n, block) logits."""
    block = block or VOCAB_BLOCK
    w, b = head.weight, getattr(head, "bias", None)
    V, n = w.shape[0], h.shape[0]
    if n and (int(target.min()) < 0 or int(target.max()) >= V):
        raise ValueError(f"target ids must be in [0, {V}), got [{int(target.min())}, {int(target.max())}]")
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
    s = torch.zeros(n, dtype=torch.float64, device=h.device)
    tl = torch.zeros(n, dtype=torch.float32, device=h.device)
    buf = torch.empty(n, min(block, V), dtype=h.dtype, device=h.device)
    for v0 in range(0, V, block):
        wb = w[v0:v0 + block]
        z = buf[:, :wb.shape[0]]
        if b is None:
            torch.mm(h, wb.T, out=z)
        else:
            torch.addmm(b[v0:v0 + block], h, wb.T, out=z)
        if softcap is not None:
            z.div_(softcap).tanh_().mul_(softcap)
        z = z.float()
        inb = (target >= v0) & (target < v0 + wb.shape[0])
        got = z.gather(1, (target - v0).clamp(0, wb.shape[0] - 1)[:, None])[:, 0]
        tl = torch.where(inb, got, tl)
        new_m = torch.maximum(m, z.amax(1))
        s = s * torch.exp(m - new_m).double() + z.sub_(new_m[:, None]).exp_().sum(1, dtype=torch.float64)
        m = new_m
    return (m.double() + s.log()).float() - tl


def chunk_tokens_for(vocab_size: int) -> int:
    """Tokens per lm_head chunk: about 2**24 logits (64 MB fp32), between 16 and 1024 tokens."""
    return max(16, min(1024, (1 << 24) // max(1, int(vocab_size))))


def token_nll(model, input_ids, attention_mask, labels=None, chunk_tokens: int | None = None):
    """Next-token NLL (B, T-1) in float32 and the bool mask of positions that count.

    Without labels a position t counts when tokens t and t+1 are both real; with labels (-100 = ignore)
    when labels[t+1] != -100. The full (B,T,V) logits are never built: the base model gives the last
    hidden states, and lm_head (+ final logit softcapping) + log-softmax run on the counted positions in
    chunks of `chunk_tokens` (default: chunk_tokens_for(V)), each under activation checkpointing when
    grad is needed, so the backward recomputes one chunk's logits at a time. Without grad each chunk
    (default NOGRAD_CHUNK_TOKENS) is also blocked over the vocabulary (`_blocked_nll`)."""
    target = (input_ids if labels is None else labels)[:, 1:]
    if labels is None:
        valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    else:
        valid = target != -100
    parts = _head_parts(model)
    if parts is None:  # no base/head split: full logits
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        nll = F.cross_entropy(logits.float().transpose(1, 2), target.clamp_min(0), reduction="none")
        return nll * valid, valid
    base, head, softcap = parts
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1]
    h, tgt = hidden[valid], target[valid]
    ckpt = torch.is_grad_enabled() and h.requires_grad
    blocked = not ckpt and isinstance(getattr(head, "weight", None), torch.Tensor) and head.weight.dim() == 2
    n = chunk_tokens or (NOGRAD_CHUNK_TOKENS if blocked else chunk_tokens_for(head.weight.shape[0]))
    pieces = []
    for i in range(0, h.shape[0], n):
        if ckpt:
            pieces.append(checkpoint(_chunk_nll, head, softcap, h[i:i + n], tgt[i:i + n], use_reentrant=False))
        elif blocked:
            pieces.append(_blocked_nll(head, softcap, h[i:i + n], tgt[i:i + n]))
        else:
            pieces.append(_chunk_nll(head, softcap, h[i:i + n], tgt[i:i + n]))
    flat = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)
    nll = torch.zeros(valid.shape, dtype=torch.float32, device=flat.device).masked_scatter(valid, flat)
    return nll, valid


CPU_MAX_TOKENS = 512   # padded tokens per batch on a CPU: past this, bigger batches ran slower (bench/NOTES.md)
GPU_MAX_TOKENS = 16384   # elsewhere, when neither max_tokens nor batch_size x max_length is given


def token_budget(batch_size: int | None, max_length: int | None, max_tokens: int | None, device) -> int | None:
    """Padded tokens per length-sorted batch: `max_tokens` when given; else batch_size texts of max_length
    tokens (the most a padded batch of the old kind could take), on a CPU at most CPU_MAX_TOKENS; with
    neither, CPU_MAX_TOKENS or GPU_MAX_TOKENS."""
    if max_tokens is not None:
        return int(max_tokens)
    budget = batch_size * max_length if batch_size is not None and max_length is not None else None
    if torch.device(device).type == "cpu":
        return CPU_MAX_TOKENS if budget is None else min(budget, CPU_MAX_TOKENS)
    return GPU_MAX_TOKENS if budget is None else budget


@torch.no_grad()
def sequence_nll(model, seqs, pad_id: int = 0, batch_size: int | None = None, max_tokens: int | None = None,
                 chunk_tokens: int | None = None, progress: bool = False, desc: str = "nll"):
    """Summed next-token NLL (N,) float64 and the number of predicted tokens (N,) int64 of each id list in
    `seqs`, in the given order (the first token of a sequence is not predicted).

    Sequences are batched by length (`length_buckets`: at most `batch_size` sequences and `max_tokens` padded
    tokens per batch; max_tokens None = CPU_MAX_TOKENS on a CPU, GPU_MAX_TOKENS elsewhere) and right-padded, and
    `token_nll` runs the LM head on the predicted positions only (no full logits, no logits of the last
    position, no KV cache) in chunks of `chunk_tokens` tokens (default NOGRAD_CHUNK_TOKENS), each blocked
    over the vocabulary (VOCAB_BLOCK lm_head rows at a time).
    `model`: an HF causal LM or a Steerer."""
    model = model.model if hasattr(model, "record_neurons") else model
    dev = model.get_input_embeddings().weight.device
    n = len(seqs)
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.long)
    buckets = length_buckets([len(s) for s in seqs], batch_size, token_budget(None, None, max_tokens, dev))
    for idx in _progress(buckets, progress, total=len(buckets), desc=desc):
        if len(seqs[idx[-1]]) < 2:   # sorted: every sequence of this batch has < 2 tokens
            continue
        ids, mask = pad_right([seqs[i] for i in idx], pad_id, dev)
        nll, valid = token_nll(model, ids, mask, chunk_tokens=chunk_tokens)
        at = torch.as_tensor(idx)
        sums[at] = nll.double().sum(1).cpu()
        counts[at] = valid.sum(1).cpu()
    return sums, counts


def sample_nll(model, input_ids, attention_mask) -> torch.Tensor:
    """Mean next-token NLL of each text (B,), padding excluded (HF `labels=input_ids` loss per text)."""
    nll, valid = token_nll(model, input_ids, attention_mask)
    return nll.sum(1) / valid.sum(1).clamp_min(1)


@contextlib.contextmanager
def frozen(model):
    """Eval mode and no parameter gradients for the duration; restores both."""
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(training)


def _progress(iterable, enabled: bool, total=None, desc=None):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)
