"""Request admission in the frontend process (vllm.LLM, vllm serve): `InputProcessor.process_inputs` is
wrapped so that, on an engine with an xlkernels config section,

- a request's `extra_args` (over HTTP: `vllm_xargs`) are checked: an unknown plan or language, a plan that
  does not fit the model, a statistics group over HTTP, or an unknown `xlk_*` key is rejected with a
  VLLMValidationError (HTTP 400) naming it; it is never served unsteered;
- a steered request gets a cache salt of its plan, language and plan version, so it never shares KV-cache
  blocks with unsteered requests or with other plans or languages;
- a statistics request never reads the prefix cache (every token of it must be counted).

The registry of plans is built from the config when the processor starts; xlkernels.vllm.LLM keeps it in
step with plans it registers later.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from . import config
from .plans import KEY_LANG, KEY_PLAN, KEY_STATS, check_supported, plan_languages, steers_heads

log = logging.getLogger("xlkernels.vllm")
KNOWN = {KEY_PLAN, KEY_LANG, KEY_STATS}


@dataclass
class Entry:
    languages: list = field(default_factory=list)
    version: int = 0
    error: str | None = None


@dataclass
class Registry:
    plans: dict = field(default_factory=dict)   # name -> Entry
    max_groups: int = 0
    allow_stats: bool = False                   # True for xlkernels.vllm.LLM (collect_stats)
    versions: int = 0

    def add(self, name, languages, error=None):
        self.versions += 1
        self.plans[name] = Entry(list(languages), self.versions, error)

    def admit(self, extra) -> str | None:
        """Check a request's extra_args; the cache salt for a steered request (None otherwise)."""
        extra = extra or {}
        bad = sorted(k for k in extra if isinstance(k, str) and k.startswith("xlk_") and k not in KNOWN)
        if bad:
            raise ValueError(f"unknown xlkernels request keys {bad} (known: {sorted(KNOWN)})")
        name, lang, group = extra.get(KEY_PLAN), extra.get(KEY_LANG), extra.get(KEY_STATS)
        if group is not None:
            if not self.allow_stats:
                raise ValueError(f"{KEY_STATS}: neuron statistics are collected with xlkernels.vllm.collect_stats, "
                                 "not through this server")
            if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < self.max_groups:
                raise ValueError(f"{KEY_STATS} must be an int in [0, {self.max_groups}), got {group!r}")
        if name is None:
            if lang is not None:
                raise ValueError(f"{KEY_LANG}={lang!r} was given without {KEY_PLAN}")
            return None
        entry = self.plans.get(name) if isinstance(name, str) else None
        if entry is None:
            raise ValueError(f"{KEY_PLAN}: unknown steering plan {name!r} (this engine has {sorted(self.plans)})")
        if entry.error:
            raise ValueError(f"{KEY_PLAN}: plan {name!r} cannot be served on this engine: {entry.error}")
        if entry.languages and lang not in entry.languages:
            raise ValueError(f"{KEY_LANG}: plan {name!r} holds a shift bank; the language must be one of "
                             f"{entry.languages}, got {lang!r}")
        if not entry.languages and lang is not None:
            raise ValueError(f"{KEY_LANG}: plan {name!r} has no shift bank; leave the language out, got {lang!r}")
        return f"xlk:{name}:{lang}:{entry.version}"


def heads_refusal(vllm_config, settings) -> str | None:
    """What the frontend can tell from the config alone about steering heads (the workers check the layers)."""
    if not settings.max_plans:
        return "steering plans are off (max_plans = 0)"
    if getattr(vllm_config.model_config, "use_mla", False):
        return "the model uses MLA attention, whose output has no per-head rows"
    return None


def build(vllm_config, settings) -> Registry:
    """The registry of the config's plans, each checked as the workers will check it."""
    from ..analysis.steering.plan import SteeringPlan
    from .install import model_dims
    reg = Registry(max_groups=settings.max_groups)
    dims, heads, rows = model_dims(vllm_config), heads_refusal(vllm_config, settings), settings.max_plans
    for name, path in settings.plans.items():
        try:
            plan = SteeringPlan.load(path)
            plan.validate(dims)
            check_supported(plan)
            if steers_heads(plan) and heads:
                raise ValueError(f"the plan gates or shifts heads, which this engine cannot: {heads}")
            need = max(1, len(plan_languages(plan)))
            if need > rows:
                raise ValueError(f"the plan needs {need} plan-table rows, {rows} are left of max_plans")
            rows -= need
            reg.add(name, plan_languages(plan))
        except Exception as e:
            reg.add(name, [], error=f"{type(e).__name__}: {e}")
            log.error("xlkernels.vllm: plan %r (%s) cannot be served: %s", name, path, e)
    return reg


def patch() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor
    if getattr(InputProcessor.process_inputs, "_xlk", False):
        return
    init, process = InputProcessor.__init__, InputProcessor.process_inputs

    def __init__(self, vllm_config, *args, **kwargs):
        init(self, vllm_config, *args, **kwargs)
        settings = config.of(vllm_config)
        self._xlk_registry = None if settings is None else build(vllm_config, settings)

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        reg = getattr(self, "_xlk_registry", None)
        extra = getattr(params, "extra_args", None)
        if reg is None:
            return process(self, request_id, prompt, params, *args, **kwargs)
        try:
            salt = reg.admit(extra)
        except ValueError as e:
            raise VLLMValidationError(f"xlkernels: {e}") from None
        req = process(self, request_id, prompt, params, *args, **kwargs)
        if salt is not None:
            req.cache_salt = f"{req.cache_salt}|{salt}" if req.cache_salt else salt
        if (extra or {}).get(KEY_STATS) is not None and req.sampling_params is not None:
            req.sampling_params.skip_reading_prefix_cache = True
        return req

    __init__._xlk = process_inputs._xlk = True
    InputProcessor.__init__, InputProcessor.process_inputs = __init__, process_inputs
