"""xlkernels.vllm.LLM: vllm.LLM with xlkernels configured (additional_config["xlkernels"], config.py), steering
plans registered at run time and chosen per request, and per-language neuron statistics (`collect_stats`)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import vllm
from vllm import SamplingParams

from ..stats import FIELDS, NeuronStats
from . import admission, config, runners
from .plans import KEY_LANG, KEY_PLAN, KEY_STATS, check_supported, plan_languages, steers_heads

EXTENSION = "xlkernels.vllm.worker.WorkerExtension"


def default_model_path() -> str:
    """The embedded Gemma-3-270M as a local fp32 HF directory (converted on first use)."""
    from ..models.default import _valid, default_cache_path, load_default
    path = default_cache_path()
    if not _valid(path):
        load_default(progress=True)
    return str(path)


class LLM(vllm.LLM):
    """`vllm.LLM` for xlkernels, on either model runner (V1 or V2) and any attention backend. Extra over vllm.LLM:

    - `register_plan(name, plan_or_path)`; then `generate(prompts, params, plan=name, lang=...)` (one value
      or one per prompt; None = unsteered), or `steer_params(...)` for vLLM's own calls.
    - `xlkernels.vllm.collect_stats(llm, corpus)` for per-language neuron statistics.
    - `max_plans` plan-table rows (a bank takes one per language), `max_groups` statistics groups (0 turns
      statistics off, which saves one pass over the MLP activations per layer), `plans` {name: path} to
      register at start. Defaults: the embedded model when `model` is None; prefix caching on (steered
      requests get a cache salt per plan and language, statistics requests skip reading the cache)."""

    def __init__(self, model: str | None = None, *, max_plans: int = config.MAX_PLANS,
                 max_groups: int = config.MAX_GROUPS_LLM, plans: dict | None = None, **kwargs):
        admission.patch()
        runners.patch()
        if kwargs.get("worker_extension_cls") not in (None, EXTENSION):
            raise ValueError(f"worker_extension_cls is set by xlkernels.vllm.LLM ({EXTENSION})")
        kwargs["worker_extension_cls"] = EXTENSION
        extra = dict(kwargs.pop("additional_config", None) or {})
        settings = config.parse({"plans": dict(plans or {}), "max_plans": max_plans, "max_groups": max_groups})
        extra[config.KEY] = settings.to_dict()
        kwargs["additional_config"] = extra
        kwargs.setdefault("enable_prefix_caching", True)
        if model is None:
            model = default_model_path()
            kwargs.setdefault("dtype", "float32")
        super().__init__(model=model, **kwargs)
        # one token through the engine, so that every hook has run once before the install check below (an
        # eager engine runs no warm-up of its own)
        vllm.LLM.generate(self, [{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=1, temperature=0.0),
                          use_tqdm=False)
        self.xlk_info = self.collective_rpc("xlk_setup")
        info = self.xlk_info[0]
        if not info["mlp_layers"]:
            raise RuntimeError(f"xlkernels.vllm: no gated-MLP activation of {model} was hooked (the model has no "
                               "SiluAndMul/GeluAndMul?); its neurons cannot be counted or steered")
        seen = {tuple(x) for x in info["seen"]}
        missing = [l for l in info["mlp_layers"] if ("mlp", l) not in seen]
        if missing:
            raise RuntimeError(f"xlkernels.vllm: the MLP hooks of layers {missing} did not run (a compiled model "
                               "from a cache without xlkernels?); refusing to serve unhooked")
        self.dims = info["dims"]
        self._registry = self.llm_engine.input_processor._xlk_registry
        self._registry.allow_stats = True

    def close(self) -> None:
        """Stop the engine's processes now (otherwise at interpreter exit)."""
        core = getattr(self.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    # ------------------------------------------------------------------------------------------ plans
    def register_plan(self, name: str, plan, alpha: float | None = None) -> None:
        """Send a SteeringPlan (or a plan path) to every worker under `name` (replacing one of that name).
        Shapes are checked against the model here and there; a bad plan raises and the engine keeps serving."""
        from ..analysis.steering.plan import SteeringPlan
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if isinstance(plan, SteeringPlan):
            with tempfile.TemporaryDirectory(prefix="xlk-plan-") as d:
                path = plan.save(Path(d) / "plan.safetensors")
                return self._register(name, str(path), alpha, plan)
        path = os.path.expanduser(str(plan))
        return self._register(name, path, alpha, SteeringPlan.load(path))

    def _register(self, name, path, alpha, plan):
        plan.validate(self.dims)
        check_supported(plan)
        why = self.xlk_info[0]["heads_refusal"]
        if steers_heads(plan) and why:
            raise NotImplementedError(f"the plan gates or shifts heads, which this engine cannot: {why}")
        langs = self.collective_rpc("xlk_register_plan", args=(name, path, alpha))[0]
        self._registry.add(name, langs)
        assert langs == plan_languages(plan)

    def unregister_plan(self, name: str) -> None:
        if name not in self._registry.plans:
            raise ValueError(f"no plan {name!r} is registered (have {sorted(self._registry.plans)})")
        del self._registry.plans[name]
        self.collective_rpc("xlk_unregister_plan", args=(name,))

    @property
    def plans(self) -> dict:
        return {k: list(v.languages) for k, v in self._registry.plans.items() if not v.error}

    def steer_params(self, prompts, sampling_params=None, plan=None, lang=None):
        """(prompts, params) lists for vllm's generate: each steered prompt's params get extra_args naming its
        plan and language (checked here; the engine adds the cache salt that keeps its KV cache apart)."""
        single = isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                      and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        n = len(prompts)
        plans = _per_prompt(plan, n, "plan")
        langs = _per_prompt(lang, n, "lang")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = _per_prompt(sampling_params, n, "sampling_params", SamplingParams)
        out_s = []
        for sp, name, lg in zip(params, plans, langs):
            extra = {} if name is None and lg is None else {KEY_PLAN: name, KEY_LANG: lg}
            self._registry.admit(extra)
            if extra:
                sp = sp.clone()
                sp.extra_args = {**(sp.extra_args or {}), **extra}
            out_s.append(sp)
        return prompts, out_s

    def generate(self, prompts, sampling_params=None, *, plan=None, lang=None, **kwargs):
        if plan is None and lang is None:
            return super().generate(prompts, sampling_params, **kwargs)
        prompts, params = self.steer_params(prompts, sampling_params, plan, lang)
        return super().generate(prompts, params, **kwargs)


def _per_prompt(value, n, what, kind=str):
    if value is None or isinstance(value, kind):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what} has {len(value)} entries for {n} prompts")
    return value


# ---------------------------------------------------------------------------------------------- statistics
def corpus_rows(tokenizer, corpus: dict, max_length: int = 256, packing: bool = False):
    """[(language id, token ids)]: exactly the rows (and tokens) the HF path `analysis.neurons.collect_stats`
    counts, in its order."""
    from ..analysis.neurons import stats as N
    N._check_corpus(corpus)
    make = N.packed_batches if packing else N.text_batches
    rows = []
    for ids, mask, groups in make(tokenizer, corpus, 256, max_length):
        for b in range(ids.shape[0]):
            m = mask[b].bool()
            rows.append((int(groups[b, 0]), ids[b][m].tolist()))
    return rows


def collect_stats(llm: LLM, corpus: dict, tokenizer=None, max_length: int = 256, packing: bool = False,
                  progress: bool = True) -> NeuronStats:
    """Per-language FFN neuron statistics over `corpus` ({language: texts}) inside vLLM: the same NeuronStats,
    fields (L, K, I), as `xlkernels.analysis.neurons.collect_stats` on the HF model (same tokenization,
    truncation and packing; every token of every text, none from the prefix cache). TP shards are merged.
    Raises if the engine counted another number of tokens than it was sent (never returns silent zeros)."""
    if not isinstance(llm, LLM):
        raise TypeError(f"llm must be an xlkernels.vllm.LLM, got {type(llm).__name__}")
    G = llm.xlk_info[0]["max_groups"]
    if not 1 <= len(corpus) <= G:
        raise ValueError(f"corpus has {len(corpus)} languages; this engine collects statistics for 1 to {G} "
                         "(xlkernels.vllm.LLM(max_groups=...))")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(llm.llm_engine.vllm_config.model_config.tokenizer,
                                                  local_files_only=True)
    K = len(corpus)
    rows = corpus_rows(tokenizer, corpus, max_length, packing)
    prompts = [{"prompt_token_ids": ids} for _, ids in rows]
    params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_reading_prefix_cache=True,
                             extra_args={KEY_STATS: k}) for k, _ in rows]
    llm.collective_rpc("xlk_stats_begin", args=(K,))
    try:
        vllm.LLM.generate(llm, prompts, params, use_tqdm=progress)
    finally:
        shards = llm.collective_rpc("xlk_stats_end", args=(K,))
    stats = merge_shards(shards)
    want = torch.zeros(K, dtype=torch.int64)
    for k, ids in rows:
        want[k] += len(ids)
    got = stats.tokens[0]
    if not torch.equal(got, want) or not torch.equal(stats.tokens, want.expand_as(stats.tokens)):
        raise RuntimeError(f"xlkernels.vllm.collect_stats: the engine counted {stats.tokens[0].tolist()} tokens "
                           f"per language, {want.tolist()} were sent (tokens skipped: read from the prefix cache, "
                           "or the MLP hooks not reached)")
    return stats


def _decode(shard):
    if "stats" not in shard:
        return shard
    from safetensors.torch import load
    return {"tp_rank": shard["tp_rank"], **load(bytes(shard["stats"]))}


def merge_shards(shards) -> NeuronStats:
    """One NeuronStats from the workers' results: TP ranks hold consecutive neuron slices (concatenated along
    I); token counts are the same on every rank (rank 0's are kept, the others checked)."""
    shards = sorted((_decode(s) for s in shards), key=lambda s: s["tp_rank"])
    ranks = [s["tp_rank"] for s in shards]
    if ranks != list(range(len(shards))):
        raise ValueError(f"expected one shard per TP rank 0..{len(shards) - 1}, got ranks {ranks}")
    for s in shards[1:]:
        if not torch.equal(s["tokens"], shards[0]["tokens"]):
            raise RuntimeError(f"TP rank {s['tp_rank']} counted tokens {s['tokens'][0].tolist()}, rank 0 "
                               f"{shards[0]['tokens'][0].tolist()}")
    parts = {f: torch.cat([s[f] for s in shards], dim=-1) for f in FIELDS if f != "tokens"}
    return NeuronStats(tokens=shards[0]["tokens"].clone(), **parts)
