"""Steerer: per-layer head gates and shifts, shift banks, neuron interventions and recording for a patched model."""
import contextlib

import torch

from .. import _checks
from ..stats import _canonical_nan_

_STAT_FIELDS = ("tokens", "positive", "sum", "sum_sq", "max")


class _Record:
    def __init__(self, group_ids, num_groups, num_layers, into):
        self.group_ids, self.num_groups = group_ids, num_groups
        self.per_layer = [None] * num_layers
        self.ids_on = {}
        self.into = into                   # fresh (L, G, I) stats that layers on its device accumulate into
        self.direct = [False] * num_layers  # layer's stats are a view of `into`


class HeadCapture:
    """Filled by a forward inside `steerer.capture_heads()`; `outputs` is (L,B,H,D), detached.

    positions (B,) long: the output at that token of each sample; None: the last token; "all": the mean over
    the tokens selected by `mask` (B,T) (nonzero = selected; None = every token), in float32."""

    def __init__(self, num_layers, positions, mask=None):
        self.positions, self.mask = positions, mask
        self._per_layer = [None] * num_layers

    def _store(self, layer, out):  # out (B,T,H,D)
        B, T = out.shape[:2]
        if isinstance(self.positions, str):
            sel = self._mean(out)
        elif self.positions is None:
            sel = out[:, -1]
        else:
            if self.positions.shape[0] != B:
                raise ValueError(f"capture_heads: positions has {self.positions.shape[0]} entries, batch is {B}")
            if layer == 0 and not torch.compiler.is_compiling():
                lo, hi = int(self.positions.min()), int(self.positions.max())
                if lo < -T or hi >= T:
                    raise ValueError(f"capture_heads: positions holds {lo if lo < -T else hi}, outside [-{T}, {T})")
            pos = self.positions.to(out.device)
            sel = out[torch.arange(B, device=out.device), pos]
        self._per_layer[layer] = sel.detach()

    def _mean(self, out):
        """Mean over the selected tokens (B,H,D) float32: one weighted sum over T, no loop over tokens."""
        B, T = out.shape[:2]
        if self.mask is None:
            return out.float().mean(1)
        if tuple(self.mask.shape) != (B, T):
            raise ValueError(f"capture_heads: mask has shape {tuple(self.mask.shape)}, the attention input has "
                             f"(batch, tokens) = ({B}, {T})")
        w = (self.mask.to(out.device) != 0).float()
        total = torch.einsum("bthd,bt->bhd", out.float(), w)
        return total / w.sum(1).clamp_min(1)[:, None, None]

    @property
    def outputs(self) -> torch.Tensor:
        missing = [i for i, x in enumerate(self._per_layer) if x is None]
        if missing:
            raise RuntimeError(f"capture_heads: layers {missing} did not run; call the model inside the `with` block")
        dev = self._per_layer[0].device
        return torch.stack([x.to(dev) for x in self._per_layer])


class Steerer:
    """State of a patched model. Create with `xlkernels.patch(model)`; see the attributes and methods below.

    gate  (L,H) or (B,L,H): multiplies each head's attention output (1 = unchanged, 0 = head masked).
    shift (L,H,D) or (B,L,H,D): added to each head's output after the gate.
    Both may require grad; gradients flow through the fused attention kernel.
    Assign them or edit them in place (not through `.data`): which layers have a gate of 1 or a shift of 0 (and
    skip that work) is recomputed when the tensors' version counters change, never per forward.
    """

    def __init__(self, model, arch, config, layers, orig_impl):
        self.model, self.arch, self.config, self._orig_impl = model, arch, config, orig_impl
        attn0 = getattr(layers[0], arch.attn)
        mlp0 = getattr(layers[0], arch.mlp)
        self.num_layers = len(layers)
        self.num_heads = int(config.num_attention_heads)
        self.head_dim = int(getattr(attn0, "head_dim", None) or config.hidden_size // self.num_heads)
        down = getattr(mlp0, arch.down)
        self.num_neurons = int(getattr(down, "in_features", None) or config.intermediate_size)
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self._active = True
        self._record = None
        self._capture = None
        self.reset()

    # ---- state -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Gates to 1, shifts to 0, no shift bank, no language selection, no neuron interventions."""
        L, H, D = self.num_layers, self.num_heads, self.head_dim
        self._gate = torch.ones(L, H, dtype=torch.float32, device=self.device)
        self._shift = torch.zeros(L, H, D, dtype=torch.float32, device=self.device)
        self._bank, self._alpha, self._lang = None, 1.0, None
        self._ivs = [None] * L
        self._iv_cache = {}
        self._views = None
        self._flags = (self._gate, 0, self._shift, 0, [(True, False, True)] * L)  # known: no need to read them

    @property
    def gate(self) -> torch.Tensor:
        return self._gate

    @gate.setter
    def gate(self, value):
        L, H = self.num_layers, self.num_heads
        _checks.tensor(value, "gate", ndim=(2, 3), dtypes=_checks.FLOATS)
        if tuple(value.shape[-2:]) != (L, H):
            raise ValueError(f"gate must have shape ({L}, {H}) or (B, {L}, {H}), got {tuple(value.shape)}")
        self._gate = value

    @property
    def shift(self) -> torch.Tensor:
        return self._shift

    @shift.setter
    def shift(self, value):
        L, H, D = self.num_layers, self.num_heads, self.head_dim
        _checks.tensor(value, "shift", ndim=(3, 4), dtypes=_checks.FLOATS)
        if tuple(value.shape[-3:]) != (L, H, D):
            raise ValueError(f"shift must have shape ({L}, {H}, {D}) or (B, {L}, {H}, {D}), got {tuple(value.shape)}")
        self._shift = value

    def _heads(self, heads):
        L, H = self.num_layers, self.num_heads
        if isinstance(heads, torch.Tensor):
            heads = heads.tolist()
        out = []
        for h in heads:
            if isinstance(h, (tuple, list)):
                if len(h) != 2:
                    raise ValueError(f"heads entries must be (layer, head) pairs or flat ids, got {h!r}")
                l, i = int(h[0]), int(h[1])
            else:
                l, i = divmod(int(h), H)
                if int(h) < 0:
                    l = -1
            if not (0 <= l < L and 0 <= i < H):
                raise ValueError(f"heads holds {h!r}, outside {L} layers x {H} heads")
            out.append((l, i))
        return out

    def mask_heads(self, heads, value: float = 0.0) -> None:
        """Set the gate of each (layer, head) (or flat id layer*H+head) to `value` (0 masks the head)."""
        with torch.no_grad():
            for l, h in self._heads(heads):
                self._gate[..., l, h] = value

    def scale_heads(self, heads, factor: float) -> None:
        """Multiply the gate of each (layer, head) (or flat id) by `factor`."""
        with torch.no_grad():
            for l, h in self._heads(heads):
                self._gate[..., l, h] *= factor

    def set_shift_bank(self, bank, alpha: float = 1.0) -> None:
        """Bank (K,L,H,D) of per-language shifts; `select_languages` picks one per sample (added to `shift`)."""
        if bank is None:
            self._bank = None
            return
        L, H, D = self.num_layers, self.num_heads, self.head_dim
        _checks.tensor(bank, "bank", ndim=4, dtypes=_checks.FLOATS, shape=(None, L, H, D))
        self._bank, self._alpha = bank, float(alpha)

    def select_languages(self, ids) -> None:
        """Per-sample language ids (B,) long (None clears): shift per sample = shift + alpha*bank[ids]."""
        if ids is None:
            self._lang = None
            return
        _checks.tensor(ids, "ids", ndim=1, dtypes=(torch.int64, torch.int32))
        if self._bank is None:
            raise ValueError("select_languages needs a shift bank; call set_shift_bank(bank) first")
        _checks.ids_in_range(ids, "ids", self._bank.shape[0], allow_neg1=False)
        self._lang = ids.long()
        self._iv_cache.clear()

    def set_neuron_intervention(self, layer: int, iv) -> None:
        """Apply a NeuronIntervention (act' = act*mul + add) to layer `layer`'s MLP, or None to remove it."""
        if not 0 <= int(layer) < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if iv is not None:
            mul = iv.mul
            if mul.shape[-1] != self.num_neurons:
                raise ValueError(f"intervention for layer {layer} covers {mul.shape[-1]} neurons, "
                                 f"the MLP has {self.num_neurons}")
        self._ivs[int(layer)] = iv
        self._iv_cache.clear()

    def deactivate_neurons(self, neurons: dict) -> None:
        """Zero the activation of the given neurons: {layer: LongTensor of neuron indices}.

        Replaces any intervention already set on those layers (use set_neuron_intervention to compose)."""
        from xlkernels import NeuronIntervention

        for layer, idx in neurons.items():
            idx = torch.as_tensor(idx, dtype=torch.long)
            self.set_neuron_intervention(layer, NeuronIntervention.zero(idx, self.num_neurons))

    # ---- contexts ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def record_neurons(self, group_ids, num_groups: int, stats=None):
        """Record per-layer neuron stats of act_fn(gate) for rows with group_ids (B,T) >= 0 (-1 = skip)."""
        from xlkernels import NeuronStats

        _checks.tensor(group_ids, "group_ids", ndim=2, dtypes=(torch.int64, torch.int32))
        if int(num_groups) < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        _checks.ids_in_range(group_ids, "group_ids", int(num_groups))
        L, I, G = self.num_layers, self.num_neurons, int(num_groups)
        fresh = stats is None
        if fresh:
            stats = NeuronStats.empty(G, I, device=group_ids.device, layers=L)
        elif tuple(stats.positive.shape) != (L, G, I):
            raise ValueError(f"stats must have shape ({L}, {G}, {I}) (layers, groups, neurons), "
                             f"got {tuple(stats.positive.shape)}")
        if self._record is not None:
            raise RuntimeError("record_neurons is already active")
        rec = _Record(group_ids, G, L, stats if fresh else None)
        self._record = rec
        try:
            yield stats
        finally:
            self._record = None
        dev = stats.positive.device
        if fresh:  # layers on stats' device accumulated in place; merge the others
            for l, s in enumerate(rec.per_layer):
                if s is not None and not rec.direct[l]:
                    stats.layer(l).merge(_stats_to(s, dev))
            _canonical_nan_(stats.max)
            return
        per = [s if s is not None else NeuronStats.empty(G, I, device=dev) for s in rec.per_layer]
        new = NeuronStats.stack([_stats_to(s, dev) for s in per])
        merged = stats.merge(new) or stats
        if merged is not stats:
            for f in _STAT_FIELDS:
                getattr(stats, f).copy_(getattr(merged, f))

    @contextlib.contextmanager
    def capture_heads(self, positions=None, mask=None):
        """Capture raw per-head attention outputs (pre gate/shift), `cap.outputs` (L,B,H,D) after the forward.

        positions: (B,) long token index per sample, None = the last token, or "all" = the mean over the
        tokens where mask (B,T) bool/int is nonzero (mask None = all tokens; float32 result; a sample with no
        selected token gives zeros). mask is only for positions="all"."""
        if isinstance(positions, str):
            if positions != "all":
                raise ValueError(f"positions must be a (B,) index tensor, None or 'all', got {positions!r}")
            if mask is not None:
                _checks.tensor(mask, "mask", ndim=2, dtypes=(torch.bool, torch.int64, torch.int32, torch.uint8))
        else:
            if positions is not None:
                _checks.tensor(positions, "positions", ndim=1, dtypes=(torch.int64, torch.int32))
            if mask is not None:
                raise ValueError("mask is only used with positions='all'")
        cap = HeadCapture(self.num_layers, positions, mask)
        prev, self._capture = self._capture, cap
        try:
            yield cap
        finally:
            self._capture = prev

    @contextlib.contextmanager
    def unsteered(self):
        """Gates 1, shifts 0, no shift bank or language selection and no neuron interventions for the
        duration, on the patched path (capture_heads and record_neurons still work); restores the state."""
        keep = ("_gate", "_shift", "_bank", "_alpha", "_lang", "_ivs", "_flags")
        saved = {k: getattr(self, k) for k in keep}
        self.reset()
        try:
            yield self
        finally:
            for k, v in saved.items():
                setattr(self, k, v)
            self._iv_cache, self._views = {}, None

    @contextlib.contextmanager
    def disabled(self):
        """Run the model's plain HF path (original attention implementation and MLP forwards)."""
        if not self._active:
            yield
            return
        self._active = False
        self.model.set_attn_implementation(self._orig_impl)
        try:
            yield
        finally:
            from .attention import NAME

            self.model.set_attn_implementation(NAME)
            self._active = True

    # ---- called from the patched modules --------------------------------------------------------------
    def _layer_views(self, dev):
        """Per-layer (gate, shift) on `dev`, cached while the gate/shift tensors are the same objects and need
        no grad (views: in-place edits show through)."""
        c = self._views
        if c is not None and c[0] is self._gate and c[1] is self._shift and c[2] == dev and not (
                self._gate.requires_grad or self._shift.requires_grad):  # requires_grad_() after caching
            return c[3]
        g, s = self._gate.to(dev), self._shift.to(dev)
        per = [(g[l] if g.dim() == 2 else g[:, l], s[l] if s.dim() == 3 else s[:, l])
               for l in range(self.num_layers)]
        if self._gate.device == dev and self._shift.device == dev and not (
                self._gate.requires_grad or self._shift.requires_grad):  # views made under no_grad would not track
            self._views = (self._gate, self._shift, dev, per)
        return per

    def _layer_flags(self):
        """Per layer (gate is all 1, gate holds a 0, shift is all 0). Recomputed (one read of gate and shift) only
        after they were assigned or edited in place."""
        g, s, c = self._gate, self._shift, self._flags
        if c is not None and c[0] is g and c[1] == g._version and c[2] is s and c[3] == s._version:
            return c[4]
        L = self.num_layers
        with torch.no_grad():
            gl = g.reshape(-1, L, self.num_heads).transpose(0, 1).reshape(L, -1)
            sl = s.reshape(-1, L, self.num_heads * self.head_dim).transpose(0, 1).reshape(L, -1)
            flags = torch.stack([(gl == 1).all(1), (gl == 0).any(1), (sl == 0).all(1)], 1).tolist()
        self._flags = (g, g._version, s, s._version, flags)
        return flags

    def _attn_args(self, layer, q):
        """(gate, shift, capture, masked_heads) for one layer's attention; gate/shift None where they change
        nothing (no epilogue runs)."""
        if not self._active:
            return None, None, None, False
        dev = q.device
        masked = False
        bank = self._bank is not None and self._lang is not None
        if torch.compiler.is_compiling():
            g = self._gate[layer] if self._gate.dim() == 2 else self._gate[:, layer]
            s = self._shift[layer] if self._shift.dim() == 3 else self._shift[:, layer]
            g, s = g.to(dev), s.to(dev)
        else:
            g, s = self._layer_views(dev)[layer]
            one, masked, still = self._layer_flags()[layer]
            if self._gate.requires_grad:  # a gate or shift that needs grad is never dropped
                one = masked = False
            g = None if one else g
            s = None if still and not bank and not self._shift.requires_grad else s
        if bank:
            lang = self._lang if self._lang.device == self._bank.device else self._lang.to(self._bank.device)
            s = (s.to(self._bank.device) + self._alpha * self._bank[lang, layer]).to(dev)
        cap = self._capture
        return g, s, (cap._store if cap is not None else None), masked

    def _mlp_args(self, layer, g):
        """(stats, group_ids, intervention, checked). checked: the arguments need no per-layer checks (ids were
        checked by record_neurons and are flat int64 here), so the MLP calls glu_checked."""
        dev = g.device
        stats = group_ids = None
        rec = self._record
        if rec is not None:
            if tuple(rec.group_ids.shape) != tuple(g.shape[:-1]):
                raise ValueError(f"record_neurons: group_ids has shape {tuple(rec.group_ids.shape)} but the MLP input "
                                 f"has (batch, tokens) = {tuple(g.shape[:-1])}")
            group_ids = rec.ids_on.get(dev)
            if group_ids is None:
                group_ids = rec.ids_on[dev] = rec.group_ids.to(dev).reshape(-1).to(torch.int64).contiguous()
            stats = rec.per_layer[layer]
            if stats is None:
                if rec.into is not None and rec.into.device == dev:
                    stats, rec.direct[layer] = rec.into.layer(layer), True
                else:
                    from xlkernels import NeuronStats

                    stats = NeuronStats.empty(rec.num_groups, self.num_neurons, device=dev)
                rec.per_layer[layer] = stats
        iv = self._ivs[layer]
        if iv is not None:
            key = (layer, dev)
            cached = self._iv_cache.get(key)
            if cached is None:
                cached = self._iv_cache[key] = _iv_to(iv, dev)
            iv = cached
            if iv.mul.dim() == 2 and group_ids is None:
                if self._lang is None:
                    raise ValueError(f"layer {layer} has a per-group neuron intervention; give group ids with "
                                     "select_languages(ids) or record_neurons(group_ids, ...)")
                group_ids = self._lang.to(dev)[:, None].expand(g.shape[:-1])
            if iv.mul.dim() == 2:  # per-group: glu checks its ids against the intervention's groups
                if rec is not None and group_ids is rec.ids_on[dev]:
                    group_ids = rec.group_ids.to(dev)
                return stats, group_ids, iv, False
        return stats, group_ids, iv, True


def _stats_to(s, dev):
    if s.positive.device == dev:
        return s
    return type(s)(**{f: getattr(s, f).to(dev) for f in _STAT_FIELDS})


def _iv_to(iv, dev):
    if iv.mul.device == dev:
        return iv
    if hasattr(iv, "to"):
        return iv.to(dev)
    import copy

    out = copy.copy(iv)
    out.mul, out.add = iv.mul.to(dev), iv.add.to(dev)
    return out
