"""Worker-side hooks, installed by the plugin in every vLLM process when XLKERNELS_VLLM=1.

- The gated-MLP activations (SiluAndMul, GeluAndMul tanh) become `xlkernels_vllm::act_and_mul`, an opaque
  torch.library op: torch.compile keeps it as one node and its body runs at every step, reading the step's
  buffers (so statistics and interventions cannot be traced once and frozen).
- The CPU_ATTN backend is wrapped: after attention, steered tokens' head outputs go through `head_steer`. The
  attention op is opaque to torch.compile on CPU (vLLM's unified_attention_with_output), and it records the
  layer index that the MLP op of the same layer reads (the MLP's input depends on the attention's output, so
  the order is fixed even under compilation; Gemma3's layers share one activation module).
- The V1 model runner's `_model_forward` is wrapped: once per step it maps tokens to requests
  (input_batch.req_ids, query_start_loc) and fills persistent per-token buffers of plan rows and statistics
  groups, vectorised (one Python pass over the requests per step, none per layer).
"""
import logging

import numpy as np
import torch

from ..ops.glu import glu_checked
from ..ops.head_steer import head_steer

log = logging.getLogger("xlkernels.vllm")
ACTS = {"SiluAndMul": "silu", "GeluAndMul": "gelu_tanh"}
KEY_PLAN, KEY_LANG, KEY_STATS = "xlk_plan", "xlk_lang", "xlk_stats"


class State:
    """Everything the ops read, one per worker process."""

    def __init__(self):
        self.installed = False
        self.layer = -1               # set by the attention wrapper, read by the MLP op of the same layer
        self.attn_seen = set()        # layer indices the wrapped attention ran for (install check)
        self.mlp_calls = 0
        self.num_layers = 0           # set by the worker extension's xlk_setup
        # registered plans: rows of per-(plan, language) tables, local to this TP rank
        self.plans = {}               # name -> {lang or None: row}
        self.gate_rows = self.shift_rows = None   # (R, L, Hl), (R, L, Hl, D)
        self.attn_layers = []         # per layer: some row changes this layer's heads
        self.mul_rows = []            # per layer: (R, Il) float32 or None
        self.add_rows = []
        # statistics session
        self.stats = None             # NeuronStats (L, K, Il) or None
        # per step
        self.active = False
        self.n = 0                    # tokens of the step (without padding)
        self.rows = torch.full((0,), -1, dtype=torch.int64)    # persistent, per token
        self.groups = torch.full((0,), -1, dtype=torch.int64)
        self.sel = self.sel_rows = None   # steered tokens and their rows
        self.any_stats = False
        self.req_cache = {}
        self.warned = set()

    def buffers(self, n):
        if self.rows.numel() < n:
            size = max(n, 2 * self.rows.numel(), 256)
            self.rows = torch.full((size,), -1, dtype=torch.int64)
            self.groups = torch.full((size,), -1, dtype=torch.int64)
        return self.rows[:n], self.groups[:n]


STATE = State()


# ---------------------------------------------------------------------------------------------- per step
def _request_ids(req_id, params):
    """(plan row, stats group) of one request, parsed once and cached."""
    hit = STATE.req_cache.get(req_id)
    if hit is not None and hit[0] is params:
        return hit[1]
    extra = (getattr(params, "extra_args", None) or {}) if params is not None else {}
    row = group = -1
    name = extra.get(KEY_PLAN)
    if name is not None:
        rows = STATE.plans.get(name)
        lang = extra.get(KEY_LANG)
        key = lang if rows is not None and None not in rows else None
        if rows is None or key not in rows:
            _warn_once(req_id, f"request {req_id}: plan {name!r} / language {lang!r} is not registered on this "
                       "worker; it runs unsteered (use xlkernels.vllm.LLM, which checks before submitting)")
        else:
            row = rows[key]
    k = extra.get(KEY_STATS)
    if k is not None:
        if STATE.stats is None or not isinstance(k, int) or not 0 <= k < STATE.stats.num_groups:
            _warn_once(req_id, f"request {req_id}: statistics group {k!r} but no collection session takes it")
        else:
            group = k
    if len(STATE.req_cache) > 4096:
        STATE.req_cache.clear()
    STATE.req_cache[req_id] = (params, (row, group))
    return row, group


def _warn_once(key, msg):
    if key not in STATE.warned:
        STATE.warned.add(key)
        log.warning(msg)


def begin_step(runner, num_tokens):
    """Fill the per-token buffers for this step from the runner's persistent batch."""
    s = STATE
    s.active, s.sel, s.sel_rows, s.any_stats = False, None, None, False
    if not s.plans and s.stats is None:
        return
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    per_req = np.empty((num_reqs, 2), dtype=np.int64)
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        st = runner.requests.get(req_id)
        per_req[i] = _request_ids(req_id, st.sampling_params if st is not None else None)
    if (per_req < 0).all():
        return
    qsl = runner.query_start_loc.cpu[:num_reqs + 1]
    counts = (qsl[1:] - qsl[:-1]).to(torch.int64)
    n = int(qsl[-1])
    rows, groups = s.buffers(num_tokens)
    per = torch.from_numpy(per_req)
    rows[:n] = torch.repeat_interleave(per[:, 0], counts)
    groups[:n] = torch.repeat_interleave(per[:, 1], counts)
    rows[n:] = -1
    groups[n:] = -1
    s.n, s.active = n, True
    if (per[:, 0] >= 0).any():
        s.sel = (rows[:n] >= 0).nonzero().flatten()
        s.sel_rows = rows[s.sel]
    s.any_stats = bool((per[:, 1] >= 0).any()) and s.stats is not None


def end_step():
    STATE.active = False
    STATE.sel = STATE.sel_rows = None


# ---------------------------------------------------------------------------------------------- the MLP op
@torch.library.custom_op("xlkernels_vllm::act_and_mul", mutates_args=())
def act_and_mul(x: torch.Tensor, activation: str) -> torch.Tensor:
    """act(x[..., :I]) * x[..., I:] with this step's neuron statistics and interventions (see module doc)."""
    s = STATE
    s.mlp_calls += 1
    i = x.shape[-1] // 2
    gate, up = x[..., :i], x[..., i:]
    if not s.active:
        return glu_checked(gate, up, activation, None, None, None, None)
    layer = s.layer
    if not 0 <= layer < s.num_layers:
        # No wrapped attention ran. Never crash the engine's step: the main process refuses plans and statistics
        # on such engines, and collect_stats checks the token counts it gets back.
        _warn_once("layer", f"xlkernels.vllm: the MLP ran with no known layer index ({layer}): no statistics or "
                   "neuron edits this step (only CPU_ATTN is wrapped so far)")
        return glu_checked(gate, up, activation, None, None, None, None)
    t = x.shape[0]
    mul = s.mul_rows[layer] if s.mul_rows else None
    steer = mul is not None and s.sel is not None
    if s.any_stats:
        stats = s.stats.layer(layer)
        out = glu_checked(gate, up, activation, s.groups[:t], None, None, stats)
        if steer:
            sel = s.sel
            out[sel] = glu_checked(gate[sel], up[sel], activation, s.sel_rows, mul, s.add_rows[layer], None)
        return out
    if steer:
        return glu_checked(gate, up, activation, s.rows[:t], mul, s.add_rows[layer], None)
    return glu_checked(gate, up, activation, None, None, None, None)


@act_and_mul.register_fake
def _(x, activation):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _act_class(base, activation_of):
    class Steered(base):
        def forward(self, x):
            act = activation_of(self)
            if act is None:   # an activation glu lacks (e.g. exact GELU): vLLM's own, and no neuron hooks
                return super().forward(x)
            return torch.ops.xlkernels_vllm.act_and_mul(x, act)
    Steered.__name__ = Steered.__qualname__ = f"Xlk{base.__name__}"
    return Steered


# ---------------------------------------------------------------------------------------------- attention
def steer_heads(layer_idx, output, n):
    """In place on output (T, H, D) (or (T, H*D)): gate/shift the steered tokens' heads of this layer."""
    s = STATE
    if not s.active or s.sel is None or not s.attn_layers or not s.attn_layers[layer_idx]:
        return
    H, D = s.gate_rows.shape[-1], s.shift_rows.shape[-1]
    o = output[:n].view(n, H, D)
    sel, rows = s.sel, s.sel_rows
    g = s.gate_rows[rows, layer_idx]            # (S, H)
    sh = s.shift_rows[rows, layer_idx]          # (S, H, D)
    o[sel] = head_steer(o[sel].unsqueeze(1), g, sh).squeeze(1)


def _attention_backend():
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    class SteeredCPUAttentionImpl(CPUAttentionBackendImpl):
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            idx = getattr(self, "_xlk_layer", None)
            if idx is None:
                idx = self._xlk_layer = extract_layer_index(layer.layer_name)
            STATE.layer = idx
            STATE.attn_seen.add(idx)
            out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            if attn_metadata is not None:
                steer_heads(idx, output, attn_metadata.num_actual_tokens)
            return out

    class SteeredCPUAttentionBackend(CPUAttentionBackend):
        @staticmethod
        def get_impl_cls():
            return SteeredCPUAttentionImpl

    return SteeredCPUAttentionBackend


SteeredCPUAttentionBackend = None   # filled by install() (the registry imports it by name)


# ---------------------------------------------------------------------------------------------- install
def install():
    """Idempotent: OOT activations, the CPU_ATTN wrapper, the runner hook."""
    global SteeredCPUAttentionBackend
    if STATE.installed:
        return
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot
    from vllm.model_executor.layers import activation as A
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    acts = {"SiluAndMul": lambda m: "silu",
            "GeluAndMul": lambda m: "gelu_tanh" if getattr(m, "approximate", "none") == "tanh" else None}
    for name, of in acts.items():
        if name not in op_registry_oot:
            CustomOp.register_oot(_act_class(getattr(A, name), of), name=name)
    if current_platform.is_cpu():
        SteeredCPUAttentionBackend = _attention_backend()
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.SteeredCPUAttentionBackend")

    orig = GPUModelRunner._model_forward
    if not getattr(orig, "_xlk", False):
        def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None,
                           **kw):
            t = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            begin_step(self, t)
            try:
                return orig(self, input_ids=input_ids, positions=positions,
                            intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds, **kw)
            finally:
                end_step()
        _model_forward._xlk = True
        GPUModelRunner._model_forward = _model_forward
    STATE.installed = True
