"""The engine's xlkernels settings: `additional_config["xlkernels"]` of vLLM's config.

    vllm serve MODEL --additional-config '{"xlkernels": {"plans": {"de": "/plans/de.safetensors"}}}'

Keys (all optional): "plans" {name: path of a SteeringPlan file}, registered when the engine starts;
"max_plans" plan-table rows (a plan takes one row, a shift bank one per language; 0 turns steering off);
"max_groups" statistics groups (0 turns statistics off). vLLM hashes additional_config into its compile-cache
key, so an engine with xlkernels never reuses a compiled model of one without (whose hooks would be missing):
only names, paths and sizes belong here. An engine without the key runs exactly as plain vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass, field

KEY = "xlkernels"
MAX_PLANS = 16
MAX_GROUPS_LLM = 8      # xlkernels.vllm.LLM: statistics on by default
MAX_GROUPS_SERVE = 0    # vllm serve: statistics are collected through the offline LLM


@dataclass(frozen=True)
class Settings:
    plans: dict = field(default_factory=dict)
    max_plans: int = MAX_PLANS
    max_groups: int = MAX_GROUPS_SERVE

    def to_dict(self) -> dict:
        return {"plans": dict(self.plans), "max_plans": self.max_plans, "max_groups": self.max_groups}


def _count(raw, key, default):
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 4096:
        raise ValueError(f'additional_config["{KEY}"]["{key}"] must be an int in [0, 4096], got {v!r}')
    return v


def parse(raw) -> Settings:
    """Settings from the dict under additional_config["xlkernels"]; ValueError names the bad key."""
    if not isinstance(raw, dict):
        raise ValueError(f'additional_config["{KEY}"] must be a dict, got {type(raw).__name__}')
    unknown = set(raw) - {"plans", "max_plans", "max_groups"}
    if unknown:
        raise ValueError(f'additional_config["{KEY}"] has unknown keys {sorted(unknown)} '
                         '(known: plans, max_plans, max_groups)')
    plans = raw.get("plans", {}) or {}
    if not isinstance(plans, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                              for k, v in plans.items()):
        raise ValueError(f'additional_config["{KEY}"]["plans"] must map plan names to file paths, got {plans!r}')
    return Settings(plans=dict(plans), max_plans=_count(raw, "max_plans", MAX_PLANS),
                    max_groups=_count(raw, "max_groups", MAX_GROUPS_SERVE))


def of(vllm_config) -> Settings | None:
    """The engine's settings, or None where xlkernels is not configured for it."""
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, dict) or KEY not in extra:
        return None
    return parse(extra[KEY])
