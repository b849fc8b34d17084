"""The worker extension (`worker_extension_cls`): collective_rpc methods that register steering plans and run
statistics sessions inside each vLLM worker. Importing it installs the hooks too (a safety net for a
checkout whose entry point is shadowed), when XLKERNELS_VLLM=1."""
import torch

from . import _hooks
from .plugin import enabled

if enabled():
    _hooks.install()

_PLANS = {}   # name -> (SteeringPlan, alpha)


def _tp():
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def model_dims(vllm_config) -> dict:
    cfg = vllm_config.model_config.hf_text_config
    H = int(cfg.num_attention_heads)
    return {"num_layers": int(cfg.num_hidden_layers), "num_heads": H,
            "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // H),
            "num_neurons": int(cfg.intermediate_size), "hidden_size": int(cfg.hidden_size)}


def plan_rows(plan, alpha, dims, rank, world):
    """[(lang or None, gate (L,Hl), shift (L,Hl,D), {layer: mul (Il,)})] for this TP rank's heads/neurons."""
    L, H, D, I = dims["num_layers"], dims["num_heads"], dims["head_dim"], dims["num_neurons"]
    Hl, Il = H // world, I // world
    h0, i0 = rank * Hl, rank * Il
    gate = torch.ones(L, H) if plan.gate is None else plan.gate.float()
    muls = {}
    for layer, idx in plan.neurons.items():
        m = torch.ones(I)
        m[idx.long()] = 0.0
        muls[int(layer)] = m[i0:i0 + Il].contiguous()
    if plan.shift is not None and plan.shift.dim() == 4:
        shifts = [(lang, alpha * plan.shift[k].float()) for k, lang in enumerate(plan.languages)]
    else:
        shifts = [(None, torch.zeros(L, H, D) if plan.shift is None else alpha * plan.shift.float())]
    return [(lang, gate[:, h0:h0 + Hl].contiguous(), s[:, h0:h0 + Hl].contiguous(), muls) for lang, s in shifts]


def rebuild(dims, rank, world):
    """The row tables of every registered plan, in STATE."""
    S = _hooks.STATE
    L = dims["num_layers"]
    plans, gates, shifts, muls = {}, [], [], []
    for name, (plan, alpha) in _PLANS.items():
        plans[name] = {}
        for lang, g, s, m in plan_rows(plan, alpha, dims, rank, world):
            plans[name][lang] = len(gates)
            gates.append(g)
            shifts.append(s)
            muls.append(m)
    if not gates:
        S.plans, S.gate_rows, S.shift_rows, S.attn_layers, S.mul_rows, S.add_rows = {}, None, None, [], [], []
        return
    gate_rows, shift_rows = torch.stack(gates), torch.stack(shifts)
    Il = dims["num_neurons"] // world
    mul_rows, add_rows = [], []
    for layer in range(L):
        if any(layer in m for m in muls):
            mr = torch.stack([m.get(layer, torch.ones(Il)) for m in muls])
            mul_rows.append(mr)
            add_rows.append(torch.zeros_like(mr))
        else:
            mul_rows.append(None)
            add_rows.append(None)
    attn = ((gate_rows != 1).flatten(2).any(2) | (shift_rows != 0).flatten(2).any(2)).any(0).tolist()
    # swap in one go: a step reads a consistent set
    S.gate_rows, S.shift_rows, S.mul_rows, S.add_rows, S.attn_layers = gate_rows, shift_rows, mul_rows, add_rows, attn
    S.plans = plans


class WorkerExtension:
    """Mixed into vLLM's worker class; call through `llm.collective_rpc("xlk_...")`."""

    def xlk_setup(self) -> dict:
        """Install the hooks (idempotent), record the model's dims; report what this worker runs."""
        _hooks.install()
        S = _hooks.STATE
        dims = model_dims(self.vllm_config)
        S.num_layers = dims["num_layers"]
        rank, world = _tp()
        model = self.model_runner.get_model() if hasattr(self.model_runner, "get_model") else None
        impls, acts = set(), 0
        if model is not None:
            for mod in model.modules():
                impl = getattr(mod, "impl", None)
                if impl is not None and hasattr(mod, "layer_name"):
                    impls.add(type(impl).__name__)
                if type(mod).__name__.startswith("Xlk") and type(mod).__name__.endswith("AndMul"):
                    acts += 1
        pp = self.vllm_config.parallel_config.pipeline_parallel_size
        return {"runner": type(self.model_runner).__module__ + "." + type(self.model_runner).__name__,
                "v2": bool(getattr(self.vllm_config, "use_v2_model_runner", False)),
                "tp_rank": rank, "tp_size": world, "pp_size": pp, "attention_impls": sorted(impls),
                "steered_activations": acts, "dims": dims,
                "compilation_mode": str(self.vllm_config.compilation_config.mode)}

    def xlk_register_plan(self, name: str, path: str, alpha=None) -> list:
        """Load the plan file, check it against the model, add its rows. Returns the plan's languages."""
        from ..analysis.steering.plan import SteeringPlan
        dims = model_dims(self.vllm_config)
        plan = SteeringPlan.load(path)
        plan.validate(dims)
        check_supported(plan)
        rank, world = _tp()
        _PLANS[name] = (plan, plan.alpha if alpha is None else float(alpha))
        try:
            rebuild(dims, rank, world)
        except Exception:
            _PLANS.pop(name, None)
            rebuild(dims, rank, world)
            raise
        _hooks.STATE.req_cache.clear()
        return list(plan.languages) if plan.shift is not None and plan.shift.dim() == 4 else []

    def xlk_unregister_plan(self, name: str) -> None:
        _PLANS.pop(name, None)
        rank, world = _tp()
        rebuild(model_dims(self.vllm_config), rank, world)
        _hooks.STATE.req_cache.clear()

    def xlk_stats_begin(self, num_groups: int) -> None:
        from ..stats import NeuronStats
        S = _hooks.STATE
        if S.stats is not None:
            raise RuntimeError("a statistics session is already running on this engine")
        dims = model_dims(self.vllm_config)
        _, world = _tp()
        S.stats = NeuronStats.empty(int(num_groups), dims["num_neurons"] // world, layers=dims["num_layers"])
        S.req_cache.clear()
        S.mlp_calls = 0

    def xlk_stats_end(self) -> dict:
        """Ends the session: this rank's stats (its neuron slice) as safetensors bytes, and its tp_rank."""
        S = _hooks.STATE
        stats, S.stats = S.stats, None
        S.req_cache.clear()
        if stats is None:
            raise RuntimeError("no statistics session is running on this engine")
        from safetensors.torch import save
        rank, _ = _tp()
        blob = save({f: getattr(stats, f).contiguous() for f in ("tokens", "positive", "sum", "sum_sq", "max")})
        return {"tp_rank": rank, "stats": blob, "mlp_calls": S.mlp_calls}   # bytes: the RPC is msgpack


def check_supported(plan):
    if plan.itlc is not None or plan.incline is not None:
        raise ValueError("the plan holds residual-stream steering (ITLC/INCLINE), which the vLLM engine does not "
                         "run yet; use the HF path (xlkernels.patch) for it")
