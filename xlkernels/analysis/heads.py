"""LAHIS: language attention head importance scores (Liu et al., AAAI-26; docs/methods.md section 1).

One scalar gate per (layer, query head) multiplies the head's attention output before o_proj. The score of
a head for a language is S = (I/N) * (C/N) over N texts, with I the summed |dL/dg|*g and C the number of
texts whose g*dL/dg is negative (raising the gate lowers the loss).

Modes:
- "gradient": the gradient at g = 1 for every text. One forward and one backward per BATCH: the steerer gate
  is a (B,L,H) ones tensor and the loss is the SUM of the per-text mean NLLs, so row b of the gate gradient
  is exactly text b's gradient. Padding is excluded from the loss.
- "paper": the released code (src/attn_matrix.py): batch size 1, an AdamW step (lr 1e-2, weight decay
  0.01) on the mask after every text, so the mask drifts away from 1; I uses the drifted mask and the
  x1000 factor.

The x1000 of the released code only keeps the bf16 sums of tiny gradients representable; it rescales S
by 1000 and changes no ranking or quantile set. "gradient" mode accumulates in float64 and uses
scale=1.0 unless asked.

Head sets (methods.md 1.3): flat id = layer*H + head; a language's list holds the heads with
S > quantile(S, 0.96) in descending S order; heads in the lists of >= min_rep languages are general, the
rest of each list is specific.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..hf.archs import find_layers

MODES = ("gradient", "paper")


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


# ---------------------------------------------------------------------------------------------- scores
class LahisAccumulator:
    """Sums I = sum |grad|*gate and C = #(grad*gate < 0) over texts; `scores()` gives (I/N)*(C/N)*scale."""

    def __init__(self, num_layers: int, num_heads: int, scale: float = 1.0):
        self.I = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.C = torch.zeros(num_layers, num_heads, dtype=torch.int64)
        self.N = 0
        self.scale = float(scale)

    def add(self, grad: torch.Tensor, gate: torch.Tensor | None = None):
        """grad: (L,H) for one text or (B,L,H) for B texts; gate: same shape or None (= ones)."""
        grad = grad.detach()
        if grad.dim() == 2:
            grad = grad[None]
        if grad.shape[1:] != self.I.shape:
            raise ValueError(f"grad must have shape (B, {self.I.shape[0]}, {self.I.shape[1]}), "
                             f"got {tuple(grad.shape)}")
        gate = torch.ones_like(grad) if gate is None else gate.detach().expand_as(grad)
        gm = grad * gate
        self.I += (grad.abs() * gate).double().sum(0).cpu()
        self.C += (gm < 0).sum(0).cpu()
        self.N += grad.shape[0]

    def scores(self) -> torch.Tensor:
        if self.N == 0:
            raise ValueError("no texts were scored")
        return ((self.I / self.N) * (self.C.double() / self.N) * self.scale).float()


def _dims(steerer):
    return int(steerer.num_layers), int(steerer.num_heads)


def lahis_scores(steerer, tokenizer, texts, *, mode: str = "gradient", batch_size: int = 8,
                 max_length: int = 256, scale: float | None = None, lr: float = 1e-2,
                 weight_decay: float = 0.01, mask_dtype=None, progress: bool = False) -> torch.Tensor:
    """LAHIS scores (L,H) float32 of one language's texts through a patched model (`xlkernels.patch`).

    mode "gradient": batched gradient at gate 1 (see module doc); scale defaults to 1.
    mode "paper": batch size 1 with the AdamW step on the mask (batch_size is ignored); scale defaults to
    1000 as in the released code; mask_dtype defaults to the model's dtype (bf16 in the paper).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = steerer.model
    device = next(model.parameters()).device
    seqs = encode(tokenizer, texts, max_length)
    if not seqs:
        raise ValueError("texts must hold at least one text of 2 or more tokens")
    L, H = _dims(steerer)
    acc = LahisAccumulator(L, H, scale=(1.0 if mode == "gradient" else 1000.0) if scale is None else scale)
    pad = pad_id_of(tokenizer)
    old_gate = steerer.gate
    try:
        with frozen(model):
            if mode == "gradient":
                starts = range(0, len(seqs), batch_size)
                for s in _progress(starts, progress, total=len(starts), desc="LAHIS"):
                    ids, mask = pad_right(seqs[s:s + batch_size], pad, device)
                    gate = torch.ones(ids.shape[0], L, H, device=device, requires_grad=True)
                    steerer.gate = gate
                    loss = sample_nll(model, ids, mask).sum()
                    (grad,) = torch.autograd.grad(loss, gate)
                    acc.add(grad)
            else:
                dtype = mask_dtype or next(model.parameters()).dtype
                m = torch.nn.Parameter(torch.ones(L, H, dtype=dtype, device=device))
                opt = torch.optim.AdamW([m], lr=lr, weight_decay=weight_decay)
                for s in _progress(seqs, progress, desc="LAHIS (paper)"):
                    ids, mask = pad_right([s], pad, device)
                    steerer.gate = m
                    loss = sample_nll(model, ids, mask)[0]
                    opt.zero_grad()
                    loss.backward()
                    _paper_accumulate(acc, m)
                    opt.step()
    finally:
        steerer.gate = old_gate
    return acc.scores()


def _paper_accumulate(acc: LahisAccumulator, m: torch.Tensor):
    # released code: I += |g| * m * 1000 and C += (g * m < 0), in the mask's dtype; scale applied at the end
    g = m.grad.detach()
    acc.I += (g.abs() * m.detach()).double().cpu()
    acc.C += (g * m.detach() < 0).long().cpu()
    acc.N += 1


# ---------------------------------------------------------------------------------------------- hook path
def decoder_layers(model):
    """The decoder layer list of an HF causal LM (model.model.layers, or a nested language_model)."""
    layers = find_layers(model)
    if layers is None:
        raise ValueError(f"model of type {type(model).__name__} has no decoder layer list")
    return layers


@contextlib.contextmanager
def o_proj_mask(model, mask):
    """The original code's mask as a forward pre-hook on every layer's self_attn.o_proj: the input
    (B,T,H*D) is viewed (B,T,H,D) and multiplied by mask[layer] (H,) per head."""
    layers = decoder_layers(model)
    H = mask.shape[1]
    handles = []
    for l, layer in enumerate(layers):
        def pre(mod, args, l=l):
            x = args[0]
            B, T, HD = x.shape
            y = x.view(B, T, H, HD // H) * mask[l].to(x.dtype).view(1, 1, H, 1)
            return (y.view(B, T, HD),) + tuple(args[1:])
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def lahis_scores_hooked(model, tokenizer, texts, *, mode: str = "gradient", max_length: int = 256,
                        scale: float | None = None, lr: float = 1e-2, weight_decay: float = 0.01,
                        mask_dtype=None, progress: bool = False) -> torch.Tensor:
    """The original approach on an UNPATCHED model: a mask Parameter applied by o_proj pre-hooks,
    one text at a time. Slow reference for tests and the baseline of bench/bench_lahis.py."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = next(model.parameters()).device
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    seqs = encode(tokenizer, texts, max_length)
    if not seqs:
        raise ValueError("texts must hold at least one text of 2 or more tokens")
    acc = LahisAccumulator(L, H, scale=(1.0 if mode == "gradient" else 1000.0) if scale is None else scale)
    dtype = mask_dtype or next(model.parameters()).dtype
    m = torch.nn.Parameter(torch.ones(L, H, dtype=dtype, device=device))
    opt = torch.optim.AdamW([m], lr=lr, weight_decay=weight_decay)
    with frozen(model), o_proj_mask(model, m):
        for s in _progress(seqs, progress, desc="LAHIS (hooks)"):
            ids = torch.as_tensor([s], device=device)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            _paper_accumulate(acc, m)
            if mode == "paper":
                opt.step()
    return acc.scores()


# ---------------------------------------------------------------------------------------------- head sets
def flat_id(layer: int, head: int, num_heads: int) -> int:
    return int(layer) * int(num_heads) + int(head)


def unflat(idx: int, num_heads: int) -> tuple[int, int]:
    return divmod(int(idx), int(num_heads))


def top_heads(scores: torch.Tensor, q: float = 0.96) -> list[int]:
    """Flat ids with S > quantile(S, q) (float64, linear interpolation), by descending S."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    flat = scores.detach().reshape(-1).double().cpu()
    thr = torch.quantile(flat, q)
    idx = (flat > thr).nonzero().reshape(-1)
    order = torch.argsort(flat[idx], descending=True, stable=True)
    return idx[order].tolist()


def top_k_heads(scores: torch.Tensor, k: int) -> list[int]:
    """Flat ids of the k highest raw scores, descending."""
    flat = scores.detach().reshape(-1).double().cpu()
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k must be in [1, {flat.numel()}], got {k}")
    return torch.topk(flat, k).indices.tolist()


def effective_min_rep(min_rep: int, num_langs: int) -> int | None:
    """min_rep clamped to the number of languages: with K < min_rep languages a head must be in all K
    lists to be general; with one language nothing is general (None)."""
    if min_rep < 1:
        raise ValueError(f"min_rep must be >= 1, got {min_rep}")
    if num_langs < 2:
        return None
    return max(2, min(min_rep, num_langs))


def head_sets(scores: dict, q: float = 0.96, min_rep: int = 4) -> dict:
    """Per-language top lists, general heads and specific lists (methods.md 1.3).

    scores: {lang: (L,H)}. Returns {"top": {lang: [ids]}, "general": [ids], "specific": {lang: [ids]},
    "min_rep": effective value, "q": q}. General heads are ordered by how many lists hold them, then by
    first appearance; lists keep descending-score order."""
    if not scores:
        raise ValueError("scores must hold at least one language")
    top = {lang: top_heads(s, q) for lang, s in scores.items()}
    rep = effective_min_rep(min_rep, len(top))
    counts = Counter(i for ids in top.values() for i in ids)
    general = [] if rep is None else [i for i, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c >= rep]
    gen = set(general)
    specific = {lang: [i for i in ids if i not in gen] for lang, ids in top.items()}
    return {"top": top, "general": general, "specific": specific, "min_rep": rep, "q": q}
