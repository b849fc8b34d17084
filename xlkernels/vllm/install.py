"""Load-time installation in a worker, right after its model runner loaded the model (runners.py calls
`install(runner)`; nothing happens unless the engine's config has an "xlkernels" section, config.py):

- the state (state.py) sized to the runner's largest padded batch, the plan tables and statistics;
- every decoder layer's gated-MLP activation (SiluAndMul, GeluAndMul tanh) becomes its own instance of a
  subclass whose forward calls xlkernels_vllm::act_and_mul with the layer index (Gemma3's layers share one
  activation module: each layer gets a copy);
- every attention layer's impl gets its steered subclass (attention.py), when plans are on;
- the plans named in the config are registered.
"""
from __future__ import annotations

import copy
import functools
import logging

import torch

from . import attention, config, ops
from .plans import register
from .state import State

log = logging.getLogger("xlkernels.vllm")


def model_dims(vllm_config) -> dict:
    cfg = vllm_config.model_config.hf_text_config
    H = int(cfg.num_attention_heads)
    return {"num_layers": int(cfg.num_hidden_layers), "num_heads": H,
            "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // H),
            "num_neurons": int(cfg.intermediate_size), "hidden_size": int(cfg.hidden_size)}


def tp_rank_world():
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def check_engine(vllm_config, settings) -> None:
    """Refuse, before anything runs, what the hooks cannot serve correctly."""
    if vllm_config.speculative_config is not None:
        raise NotImplementedError("xlkernels.vllm does not support speculative decoding: the tokens a step runs "
                                  "can differ from the ones scheduled, so per-request steering and statistics "
                                  "could land on the wrong tokens. Start the engine without speculative_config.")
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        raise NotImplementedError("xlkernels.vllm supports tensor parallelism, not pipeline parallelism")
    passes = getattr(vllm_config.compilation_config, "pass_config", None)
    if settings.max_plans and getattr(passes, "fuse_attn_quant", False):
        raise NotImplementedError("xlkernels.vllm cannot steer heads when attention quantises its output to fp8 "
                                  "(compilation pass fuse_attn_quant): turn the pass off, or set "
                                  'additional_config["xlkernels"]["max_plans"] = 0')


def install(runner) -> State | None:
    settings = config.of(runner.vllm_config)
    if settings is None:
        return None
    vc = runner.vllm_config
    check_engine(vc, settings)
    dims = model_dims(vc)
    rank, world = tp_rank_world()
    cap = max(int(runner.max_num_tokens), int(vc.compilation_config.max_cudagraph_capture_size or 0))
    model = runner.get_model()
    device = next(model.parameters()).device
    state = State(dims, cap, settings.max_plans, settings.max_groups, device, rank, world)
    state.kernels = ops.kernels(device)
    state.mlp_layers = replace_activations(model)
    state.head_layers, state.heads_refusal = ([], "plans are off (max_plans = 0)")
    if state.R:
        state.head_layers, state.heads_refusal = wrap_attention(model, state)
    state.plans, state.plan_errors = {}, {}
    ops.STATE = state
    for name, path in settings.plans.items():
        try:
            register(state, name, path)
        except Exception as e:   # the frontend rejects requests naming it, with this reason
            state.plan_errors[name] = f"{type(e).__name__}: {e}"
            log.error("xlkernels.vllm: plan %r (%s) was not registered: %s", name, path, e)
    log.info("xlkernels.vllm: %d MLP layers hooked, %d attention layers steerable, %d plan rows, %d statistics "
             "groups, plans %s", len(state.mlp_layers), len(state.head_layers), state.R, state.G, sorted(state.plans))
    return state


# ---------------------------------------------------------------------------------------------- activations
ACTS = {"SiluAndMul": lambda m: "silu",
        "GeluAndMul": lambda m: "gelu_tanh" if getattr(m, "approximate", "none") == "tanh" else None}


@functools.lru_cache(maxsize=None)
def _act_class(cls):
    def forward(self, x):
        y = torch.ops.xlkernels_vllm.act_and_mul(x.reshape(-1, x.shape[-1]), self._xlk_layer, self._xlk_act)
        return y.view(*x.shape[:-1], x.shape[-1] // 2)
    return type(f"Xlk{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__, "_xlk_steered": True})


def replace_activations(model) -> list:
    """Give each decoder layer's gated-MLP activation a per-layer hooked instance; the layer indices hooked."""
    from vllm.model_executor.models.utils import extract_layer_index
    todo = []
    for qual, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent.named_children():
            kind = next((k for k in ACTS if type(child).__name__ == k or type(child).__name__ == f"Xlk{k}"), None)
            if kind is None:
                continue
            act = ACTS[kind](child)
            if act is None:
                log.warning("xlkernels.vllm: %s.%s (%s) has no fused kernel here; its neurons are not hooked",
                            qual, name, type(child).__name__)
                continue
            try:
                layer = extract_layer_index(f"{qual}.{name}")
            except (AssertionError, ValueError):   # not inside one numbered decoder layer
                log.warning("xlkernels.vllm: %s.%s is not in a numbered layer; its neurons are not hooked", qual, name)
                continue
            todo.append((parent, name, child, layer, act))
    layers = []
    for parent, name, child, layer, act in todo:
        new = copy.copy(child)
        if not getattr(type(child), "_xlk_steered", False):
            new.__class__ = _act_class(type(child))
        new._xlk_layer, new._xlk_act = layer, act
        setattr(parent, name, new)
        layers.append(layer)
    return sorted(set(layers))


# ---------------------------------------------------------------------------------------------- attention
def wrap_attention(model, state) -> tuple:
    """(steerable layer indices, None) or ([], why the heads cannot be steered)."""
    from vllm.model_executor.models.utils import extract_layer_index
    found = [m for m in model.modules() if hasattr(m, "impl") and hasattr(m, "layer_name")]
    if not found:
        return [], "no attention layer with a vLLM impl was found"
    for layer in found:
        why = attention.refusal(layer, layer.impl)
        if why:
            return [], why
    layers = []
    for layer in found:
        idx = extract_layer_index(layer.layer_name)
        attention.wrap(layer, idx, state.Hl, state.D)
        layers.append(idx)
    return sorted(layers), None
