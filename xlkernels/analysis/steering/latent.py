"""Residual-stream (or MLP-output) injection for latent steering (ITLC, INCLINE) and capture.

`inject(model, add=..., set_last=...)` installs ONE forward hook per touched layer plus one forward
pre-hook on the model (to read the batch's attention mask and whether the call is a prefill: the KV cache
is found by type, not by keyword name, which transformers has changed); each layer
hook is a whole-tensor op on (B, T, D): `addcmul(h, mask, shift)` for additive shifts, `index_put` at
the last prompt position for overwrites. No Python work per token.

A fused kernel would not pay here: the add is one broadcast FMA over the block output, a single
memory-bound pass that PyTorch already does at copy bandwidth (and which the next layer's norm reads
anyway). Fusing it into the norm would save one read+write of (B,T,D) per injected layer, a small
fraction of the layer's weight traffic.
"""
import contextlib

import torch

from ..align import _no_logits, pool, position_ids
from ..heads.lahis import decoder_layers

SITES = ("block", "mlp")
STRATEGIES = ("prompt_only", "gen_only", "prompt_and_gen")


def _module(model, layer, site):
    layers = decoder_layers(model)
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range [0, {len(layers)})")
    return layers[layer] if site == "block" else layers[layer].mlp


class _State:
    """Per-forward facts set by the model pre-hook: the current tokens' mask and prefill flag."""
    mask = None      # (B, T) bool over the tokens of this call, or None (all real)
    prefill = True


def _pre_hook(state):
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        T = ids.shape[1] if ids is not None else emb.shape[1]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        state.mask = mask[:, -T:].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        past = find_cache(args, kwargs)
        state.prefill = past is None or past.get_seq_length() == 0
    return hook


def find_cache(args, kwargs):
    """The KV cache passed to a forward, found by type: its keyword has been renamed across transformers
    releases (`past_key_values`, then `cache` in 5.24), so no keyword name is relied on."""
    from transformers.cache_utils import Cache

    for v in (*kwargs.values(), *args):
        if isinstance(v, Cache):
            return v
    return None


def _split(output):
    return (output, None) if isinstance(output, torch.Tensor) else (output[0], output)


def _join(h, rest):
    return h if rest is None else (h,) + tuple(rest[1:])


def _add_hook(state, shift, strategy):
    def hook(module, args, output):
        h, rest = _split(output)
        if state.prefill and strategy == "gen_only" or not state.prefill and strategy == "prompt_only":
            return None
        s = shift.to(h.dtype)
        s = s.view(1, 1, -1) if s.dim() == 1 else s[:, None, :]
        if state.prefill and state.mask is not None:
            m = state.mask.to(h.dtype)[..., None]
            h = torch.addcmul(h, m, s)
        else:
            h = h + s
        return _join(h, rest)
    return hook


def _last_positions(state, B, T, device):
    if state.mask is None:
        return torch.full((B,), T - 1, device=device, dtype=torch.long)
    m = state.mask.to(device)
    return T - 1 - torch.argmax(torch.flip(m.to(torch.int8), dims=[-1]), dim=-1)


def _set_last_hook(state, value, positions=None):
    def hook(module, args, output):
        if not state.prefill:
            return None
        h, rest = _split(output)
        B, T = h.shape[:2]
        pos = _last_positions(state, B, T, h.device) if positions is None else positions.to(h.device)
        v = value.to(h.dtype)
        v = v.expand(B, -1) if v.dim() == 1 else v
        h = h.index_put((torch.arange(B, device=h.device), pos), v)
        return _join(h, rest)
    return hook


@contextlib.contextmanager
def inject(model, add=None, set_last=None, strategy="prompt_and_gen", site="block", positions=None):
    """Steer the residual stream inside the `with` block; hooks are removed on exit.

    add: {layer: shift (D,) or (B, D)}: h <- h + shift at the output of decoder layer `layer`
        (site "block") or of its MLP (site "mlp"). strategy: "prompt_only" adds at prefill calls
        (real tokens only, from the attention mask), "gen_only" at decode steps (calls with a non-empty
        KV cache), "prompt_and_gen" both (ITLC's default).
    set_last: {layer: value (D,) or (B, D)}: overwrite the output at the last real prompt token, at
        prefill only (INCLINE). Later decode steps see it through the KV cache.
    positions: (B,) long: the positions set_last overwrites instead of the last real token (e.g. the
        last prompt token of a prompt + continuation scored in one forward).
    A plain forward without a cache counts as a prefill.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    add, set_last = dict(add or {}), dict(set_last or {})
    both = set(add) & set(set_last)
    if both:
        raise ValueError(f"layers {sorted(both)} appear in both add and set_last")
    D = model.config.get_text_config().hidden_size
    for name, table in (("add", add), ("set_last", set_last)):
        for layer, v in table.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name}[{layer}] must be a torch.Tensor, got {type(v).__name__}")
            if v.dim() not in (1, 2) or v.shape[-1] != D:
                raise ValueError(f"{name}[{layer}] must be (D,) or (B, D) with D={D}, got {tuple(v.shape)}")
    state = _State()
    handles = [model.register_forward_pre_hook(_pre_hook(state), with_kwargs=True)]
    try:
        dev = next(model.parameters()).device
        for layer, v in add.items():
            handles.append(_module(model, layer, site).register_forward_hook(
                _add_hook(state, v.to(dev), strategy)))
        for layer, v in set_last.items():
            handles.append(_module(model, layer, site).register_forward_hook(
                _set_last_hook(state, v.to(dev), positions)))
        yield state
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture(model, batch, layers=None, site="block"):
    """One forward over `batch` (input_ids, attention_mask); -> ({layer: (B, T, D) output}, mask (B, T)).

    Position ids count real tokens only, so padded rows match unpadded runs.
    """
    n = len(decoder_layers(model))
    layers = list(range(n)) if layers is None else list(layers)
    outs = {}

    def make(layer):
        def hook(module, args, output):
            outs[layer] = _split(output)[0].detach()
        return hook
    handles = [_module(model, l, site).register_forward_hook(make(l)) for l in layers]
    dev = next(model.parameters()).device
    mask = batch["attention_mask"].to(dev)
    try:
        model(input_ids=batch["input_ids"].to(dev), attention_mask=mask, position_ids=position_ids(mask),
              use_cache=False, **_no_logits(model))
    finally:
        for h in handles:
            h.remove()
    return outs, mask


@torch.no_grad()
def pooled_states(model, tok, texts, layers=None, site="block", pooling="mean", batch_size=8,
                  max_length=512):
    """(len(layers), n, D) float32 CPU: pooled outputs of the given layers' blocks (or MLPs) per text."""
    n_layers = len(decoder_layers(model))
    layers = list(range(n_layers)) if layers is None else list(layers)
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = None
    for s in range(0, len(texts), batch_size):
        batch = tok(texts[s:s + batch_size], return_tensors="pt", padding=True,
                    truncation=max_length is not None, max_length=max_length)
        outs, mask = capture(model, batch, layers, site)
        e = pool(torch.stack([outs[l] for l in layers]), mask, pooling).cpu()
        if out is None:
            out = torch.empty(len(layers), len(texts), e.shape[-1])
        out[:, s:s + len(e[0])] = e
    return out


@torch.no_grad()
def last_token_states(model, batch, layers=None, site="block"):
    """{layer: (B, D)} outputs at each row's last real token (one clean forward)."""
    outs, mask = capture(model, batch, layers, site)
    T = mask.shape[1]
    pos = T - 1 - torch.argmax(torch.flip(mask.to(torch.int8), dims=[-1]), dim=-1)
    ar = torch.arange(mask.shape[0], device=mask.device)
    return {l: o[ar, pos] for l, o in outs.items()}
