"""xlkernels.vllm.LLM: vllm.LLM with the xlkernels plugin enabled, steering plans selected per request, and
per-language neuron statistics (`collect_stats`)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import vllm
from vllm import SamplingParams

from ..stats import FIELDS, NeuronStats
from . import _hooks
from .plugin import ENV

EXTENSION = "xlkernels.vllm.worker.WorkerExtension"


def check_runner(vllm_config) -> None:
    """Fail loudly where vLLM runs its V2 model runner (the GPU default in 0.32), which the hooks do not reach."""
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise RuntimeError("xlkernels.vllm hooks vLLM's V1 model runner, but this engine runs the V2 runner (the "
                           "GPU default in vLLM 0.32); start it with VLLM_USE_V2_MODEL_RUNNER=0")


def default_model_path() -> str:
    """The embedded Gemma-3-270M as a local fp32 HF directory (converted on first use)."""
    from ..models.default import _valid, default_cache_path, load_default
    path = default_cache_path()
    if not _valid(path):
        load_default(progress=True)
    return str(path)


class LLM(vllm.LLM):
    """`vllm.LLM` for xlkernels. Extra over vllm.LLM:

    - `register_plan(name, plan_or_path)` once; then `generate(prompts, params, plan=name, lang=...)` (one value
      or one per prompt; None = unsteered), or `steer_params(...)` for vLLM's own calls.
    - `xlkernels.vllm.collect_stats(llm, corpus)` for per-language neuron statistics.
    Defaults: the embedded model when `model` is None; prefix caching on (steered prompts get a cache_salt per
    plan and language, statistics requests skip reading the cache). The V2 model runner is refused."""

    def __init__(self, model: str | None = None, **kwargs):
        os.environ[ENV] = "1"   # before the engine spawns: the plugin reads it in every process
        _hooks.install()
        if kwargs.get("worker_extension_cls") not in (None, EXTENSION):
            raise ValueError(f"worker_extension_cls is set by xlkernels.vllm.LLM ({EXTENSION})")
        kwargs["worker_extension_cls"] = EXTENSION
        kwargs.setdefault("enable_prefix_caching", True)
        if model is None:
            model = default_model_path()
            kwargs.setdefault("dtype", "float32")
        super().__init__(model=model, **kwargs)
        check_runner(self.llm_engine.vllm_config)
        self.xlk_info = self.collective_rpc("xlk_setup")
        info = self.xlk_info[0]
        if info["steered_activations"] == 0:
            raise RuntimeError(f"xlkernels.vllm: no gated-MLP activation of {model} was replaced (the model has no "
                               "SiluAndMul/GeluAndMul?); its neurons cannot be counted or steered")
        if info["pp_size"] != 1:
            raise NotImplementedError("xlkernels.vllm supports tensor parallelism, not pipeline parallelism yet")
        self.dims = info["dims"]
        self.heads_steerable = all("SteeredCPUAttentionImpl" in i["attention_impls"] for i in self.xlk_info)
        self._plans = {}      # name -> {"languages": [...], "version": int}
        self._version = 0

    def close(self) -> None:
        """Stop the engine's processes now (otherwise at interpreter exit)."""
        core = getattr(self.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    # ------------------------------------------------------------------------------------------ plans
    def register_plan(self, name: str, plan, alpha: float | None = None) -> None:
        """Send a SteeringPlan (or a plan path) to every worker under `name` (replacing one of that name).
        Shapes are checked against the model there; a bad plan raises here and the engine keeps serving."""
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
        from ..analysis.steering.plan import SteeringPlan  # noqa: F401 - loaded above
        from .worker import check_supported
        plan.validate(self.dims)
        check_supported(plan)
        _need_wrapped_attention(self, "steering plans")
        langs = self.collective_rpc("xlk_register_plan", args=(name, path, alpha))[0]
        self._version += 1
        self._plans[name] = {"languages": langs, "version": self._version}

    def unregister_plan(self, name: str) -> None:
        if name not in self._plans:
            raise ValueError(f"no plan {name!r} is registered (have {sorted(self._plans)})")
        self.collective_rpc("xlk_unregister_plan", args=(name,))
        del self._plans[name]

    @property
    def plans(self) -> dict:
        return {k: list(v["languages"]) for k, v in self._plans.items()}

    def _check(self, plan, lang):
        if plan is None:
            if lang is not None:
                raise ValueError(f"lang={lang!r} was given without a plan")
            return
        info = self._plans.get(plan)
        if info is None:
            raise ValueError(f"plan {plan!r} is not registered (have {sorted(self._plans)}); call register_plan")
        if info["languages"]:
            if lang not in info["languages"]:
                raise ValueError(f"plan {plan!r} holds a shift bank: lang must be one of {info['languages']}, "
                                 f"got {lang!r}")
        elif lang is not None:
            raise ValueError(f"plan {plan!r} has no shift bank; lang must be None, got {lang!r}")

    def steer_params(self, prompts, sampling_params=None, plan=None, lang=None):
        """(prompts, params) lists for vllm's generate: each steered prompt gets extra_args naming its plan
        and language and a cache_salt of that plan version (no KV shared with other steering)."""
        single = isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                      and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        n = len(prompts)
        plans = _per_prompt(plan, n, "plan")
        langs = _per_prompt(lang, n, "lang")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = _per_prompt(sampling_params, n, "sampling_params", SamplingParams)
        out_p, out_s = [], []
        for p, sp, name, lg in zip(prompts, params, plans, langs):
            self._check(name, lg)
            if name is None:
                out_p.append(p)
                out_s.append(sp)
                continue
            sp = sp.clone()
            sp.extra_args = {**(sp.extra_args or {}), _hooks.KEY_PLAN: name, _hooks.KEY_LANG: lg}
            p = _prompt_dict(p)
            p["cache_salt"] = f"xlk:{name}:{lg}:{self._plans[name]['version']}"
            out_p.append(p)
            out_s.append(sp)
        return out_p, out_s

    def generate(self, prompts, sampling_params=None, *, plan=None, lang=None, **kwargs):
        if plan is None and lang is None:
            return super().generate(prompts, sampling_params, **kwargs)
        prompts, params = self.steer_params(prompts, sampling_params, plan, lang)
        return super().generate(prompts, params, **kwargs)


def _need_wrapped_attention(llm, what):
    """Head steering happens in the wrapped attention backend, which also tells the MLP op its layer."""
    if not llm.heads_steerable:
        raise NotImplementedError(f"{what} need xlkernels' wrapped attention backend, which exists for vLLM's "
                                  f"CPU_ATTN only so far; this engine runs {llm.xlk_info[0]['attention_impls']}")


def _per_prompt(value, n, what, kind=str):
    if value is None or isinstance(value, kind):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what} has {len(value)} entries for {n} prompts")
    return value


def _prompt_dict(p):
    if isinstance(p, str):
        return {"prompt": p}
    if isinstance(p, dict):
        return dict(p)
    if isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
        return {"prompt_token_ids": list(p)}
    raise TypeError(f"a prompt must be a string, a token id list or a prompt dict, got {type(p).__name__}")


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
    _need_wrapped_attention(llm, "neuron statistics")
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
                             extra_args={_hooks.KEY_STATS: k}) for k, _ in rows]
    llm.collective_rpc("xlk_stats_begin", args=(K,))
    try:
        vllm.LLM.generate(llm, prompts, params, use_tqdm=progress)
    finally:
        shards = llm.collective_rpc("xlk_stats_end")
    stats = merge_shards(shards)
    want = torch.zeros(K, dtype=torch.int64)
    for k, ids in rows:
        want[k] += len(ids)
    got = stats.tokens[0]
    if not torch.equal(got, want) or not torch.equal(stats.tokens, want.expand_as(stats.tokens)):
        raise RuntimeError(f"xlkernels.vllm.collect_stats: the engine counted {stats.tokens[0].tolist()} tokens "
                           f"per language, {want.tolist()} were sent (tokens skipped: read from the prefix cache, "
                           "or the hooks not reached: plugin not loaded, V2 runner, attention backend not CPU_ATTN?)")
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
