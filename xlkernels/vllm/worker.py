"""The worker extension (`worker_extension_cls`) of xlkernels.vllm.LLM: collective_rpc methods that report the
install, register steering plans and run statistics sessions inside each vLLM worker."""
from __future__ import annotations

from . import ops
from .plans import register, unregister


def _state(worker):
    s = getattr(worker.model_runner, "_xlk_state", None)
    if s is None:
        raise RuntimeError("xlkernels.vllm is not installed in this worker (no \"xlkernels\" section in the "
                           "engine's additional_config?)")
    return s


class WorkerExtension:
    """Mixed into vLLM's worker class; call through `llm.collective_rpc("xlk_...")`."""

    def xlk_setup(self) -> dict:
        """What this worker runs: runner, ranks, hooked layers, which hooks ran during warm-up."""
        s = _state(self)
        runner = self.model_runner
        model = runner.get_model()
        impls = sorted({type(m.impl).__name__ for m in model.modules() if hasattr(m, "impl")
                        and hasattr(m, "layer_name")})
        return {"runner": f"{type(runner).__module__}.{type(runner).__name__}",
                "v2": bool(getattr(self.vllm_config, "use_v2_model_runner", False)),
                "tp_rank": s.rank, "tp_size": s.world, "attention_impls": impls,
                "mlp_layers": list(s.mlp_layers), "head_layers": list(s.head_layers),
                "heads_refusal": s.heads_refusal, "dims": dict(s.dims), "max_plans": s.R, "max_groups": s.G,
                "capacity": s.capacity, "plans": {k: sorted(v, key=str) for k, v in s.plans.items()},
                "plan_errors": dict(s.plan_errors), "seen": sorted(ops.SEEN),
                "compilation_mode": str(self.vllm_config.compilation_config.mode)}

    def xlk_state_ptrs(self) -> dict:
        """data_ptr of every state tensor (they must never move)."""
        return {k: t.data_ptr() for k, t in _state(self).tensors().items()}

    def xlk_register_plan(self, name: str, path: str, alpha=None) -> list:
        """Load the plan file, check it against the model, (re)place its rows. Returns its languages."""
        return register(_state(self), name, path, alpha)

    def xlk_unregister_plan(self, name: str) -> None:
        unregister(_state(self), name)

    def xlk_stats_begin(self, num_groups: int) -> None:
        s = _state(self)
        if not 1 <= int(num_groups) <= s.G:
            raise ValueError(f"{num_groups} statistics groups asked, this engine holds {s.G} "
                             "(xlkernels.vllm.LLM(max_groups=...))")
        s.stats_reset()

    def xlk_stats_end(self, num_groups: int) -> dict:
        """This rank's statistics of the first num_groups groups (its neuron slice) as safetensors bytes."""
        from safetensors.torch import save
        s = _state(self)
        stats = s.stats_take(int(num_groups))
        blob = save({f: getattr(stats, f).contiguous() for f in ("tokens", "positive", "sum", "sum_sq", "max")})
        return {"tp_rank": s.rank, "stats": blob}   # bytes: the RPC is msgpack
