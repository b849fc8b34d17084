"""Steering plans inside a worker: each plan (or each language of a shift bank) is one row of the state's plan
tables, holding this tensor-parallel rank's heads and neurons; requests name a plan and a language in
`SamplingParams.extra_args`, which `resolve` turns into (plan row, statistics group)."""
from __future__ import annotations

import torch

KEY_PLAN, KEY_LANG, KEY_STATS = "xlk_plan", "xlk_lang", "xlk_stats"


def check_supported(plan) -> None:
    if plan.itlc is not None or plan.incline is not None:
        raise ValueError("the plan holds residual-stream steering (ITLC/INCLINE), which the vLLM engine does not "
                         "run yet; use the HF path (xlkernels.patch) for it")


def steers_heads(plan) -> bool:
    return (plan.gate is not None and bool((plan.gate != 1).any())) or \
        (plan.shift is not None and bool((plan.shift != 0).any()))


def plan_languages(plan) -> list:
    return list(plan.languages) if plan.shift is not None and plan.shift.dim() == 4 else []


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


def register(state, name: str, plan, alpha=None) -> list:
    """Load (a path) and check the plan against the model, then (re)place its rows. Returns its languages."""
    from ..analysis.steering.plan import SteeringPlan
    if not isinstance(plan, SteeringPlan):
        plan = SteeringPlan.load(plan)
    plan.validate(state.dims)
    check_supported(plan)
    if not state.R:
        raise ValueError('steering plans are off on this engine (additional_config["xlkernels"]["max_plans"] = 0)')
    if steers_heads(plan) and state.heads_refusal:
        raise ValueError(f"the plan gates or shifts heads, which this engine cannot steer: {state.heads_refusal}")
    rows = plan_rows(plan, plan.alpha if alpha is None else float(alpha), state.dims, state.rank, state.world)
    unregister(state, name)
    taken = state.take_rows(len(rows))
    table = {}
    for r, (lang, g, s, muls) in zip(taken, rows):
        mul = torch.ones(state.L, state.Il)
        for layer, m in muls.items():
            mul[layer] = m
        state.write_row(r, g, s, mul)
        table[lang] = r
    state.plans[name] = table
    state.plan_errors.pop(name, None)
    return plan_languages(plan)


def unregister(state, name: str) -> None:
    for r in state.plans.pop(name, {}).values():
        state.free_row(r)


def resolve(state, extra) -> tuple:
    """(plan row, statistics group) of a request's extra_args (-1: none). The frontend checked them at
    admission (admission.py); anything unknown here is an error, never an unsteered run."""
    extra = extra or {}
    row = group = -1
    name = extra.get(KEY_PLAN)
    if name is not None:
        table = state.plans.get(name)
        lang = extra.get(KEY_LANG)
        key = lang if table is not None and None not in table else None
        if table is None or key not in table:
            raise RuntimeError(f"xlkernels.vllm: plan {name!r} / language {lang!r} is not registered on this "
                               f"worker (have {sorted(state.plans)}); refusing to run the request unsteered")
        row = table[key]
    k = extra.get(KEY_STATS)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < state.G:
            raise RuntimeError(f"xlkernels.vllm: statistics group {k!r} outside [0, {state.G})")
        group = k
    return row, group
