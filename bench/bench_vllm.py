"""Tokens/s of xlkernels inside vLLM vs the HF path, one run, the real default model (fp32).

    <vllm venv>/bin/python -m bench.bench_vllm [--quick]

Rows (metric tokens/s, higher is better):
  generate: HF `generate` (patched model, batch, greedy) | vLLM steering off | vLLM steering on (a plan with head
            gates, a shift-bank row and neuron deactivations on every request); generated tokens per second.
  collect:  HF `analysis.neurons.collect_stats` | vLLM `xlkernels.vllm.collect_stats`; corpus tokens per second.
Each figure is one timed pass after one warm-up pass (an engine start is minutes on 2 cores, so no repeats).
Writes bench/results/vllm-<device>-<date>.json with the device, commit and versions.
"""
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("VLLM_RPC_BASE_PATH", tempfile.mkdtemp(prefix="xlk-vllm-rpc-"))
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="xlk-vllm-cache-"))

import torch  # noqa: E402

from bench.common import RESULTS, device_info, device_slug  # noqa: E402

PROMPTS = ["The capital of France is", "Der Himmel ist heute", "My favourite food is", "Yesterday I went to",
           "La ciudad más grande es", "Il était une fois", "The best way to learn is", "Am Wochenende fahren wir"]


def _plan(st):
    from xlkernels.analysis.steering.plan import SteeringPlan, model_meta
    g = torch.Generator().manual_seed(0)
    L, H, D, I = st.num_layers, st.num_heads, st.head_dim, st.num_neurons
    gate = torch.ones(L, H)
    gate[2:9, 0] = 0.0
    bank = torch.zeros(2, L, H, D)
    bank[:, 4:8] = torch.randn(2, 4, H, D, generator=g) * 0.3
    neurons = {l: torch.randperm(I, generator=g)[:200].sort().values for l in (2, 5, 9)}
    return SteeringPlan(gate=gate, shift=bank, languages=["de", "fr"], neurons=neurons, meta=model_meta(st))


def _timed(fn):
    fn()
    t = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    n_prompts, new, n_texts = (8, 16, 10) if quick else (32, 32, 40)
    from vllm import SamplingParams

    import vllm
    import xlkernels
    from xlkernels.analysis import neurons as N
    from xlkernels.analysis.data import parallel_corpus
    from xlkernels.models import load_default
    from xlkernels.vllm import LLM, collect_stats

    prompts = (PROMPTS * (n_prompts // len(PROMPTS) + 1))[:n_prompts]
    corpus = {k: v[:n_texts] for k, v in parallel_corpus(["en", "de", "fr", "es"]).items()}
    rows = []

    def add(op, provider, tokens, seconds, **extra):
        tps = tokens / seconds
        rows.append({"op": op, "provider": provider, "mode": "fwd", "shape": f"{n_prompts}x{new}" if op ==
                     "generate" else f"{len(corpus)}x{n_texts}", "metric": "tokens/s", "p50": tps,
                     "tokens": tokens, "seconds": round(seconds, 3), **extra})
        print(f"{op:9} {provider:22} {tps:9.1f} tokens/s ({tokens} tokens, {seconds:.2f} s)", flush=True)

    model, tok = load_default(progress=False)
    st = xlkernels.patch(model.eval())
    plan = _plan(st)

    @torch.no_grad()
    def hf_generate():
        enc = tok(prompts, return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1,
                             top_p=None, top_k=None, temperature=None, pad_token_id=tok.eos_token_id)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)

    n, s = _timed(hf_generate)
    add("generate", "hf", n, s, steering="off")

    def hf_collect():
        stats = N.collect_stats(st, tok, corpus, batch_size=8, max_length=128, progress=False)
        return int(stats.tokens[0].sum())

    n, s = _timed(hf_collect)
    add("collect", "hf", n, s)
    del model, st

    t0 = time.perf_counter()
    llm = LLM(max_model_len=512, max_num_seqs=64, kv_cache_memory_bytes=1 << 29, seed=0)
    start_s = time.perf_counter() - t0
    llm.register_plan("bench", plan)
    sp = SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0)

    def v_generate(**kw):
        outs = llm.generate(prompts, sp, use_tqdm=False, **kw)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    n, s = _timed(v_generate)
    add("generate", "vllm", n, s, steering="off", engine_start_s=round(start_s, 1))
    langs = ["de" if i % 2 else "fr" for i in range(n_prompts)]
    n, s = _timed(lambda: v_generate(plan="bench", lang=langs))
    add("generate", "vllm", n, s, steering="on")

    def v_collect():
        return int(collect_stats(llm, corpus, tokenizer=tok, max_length=128, progress=False).tokens[0].sum())

    n, s = _timed(v_collect)
    add("collect", "vllm", n, s)

    info = device_info()
    info.update(vllm=vllm.__version__, engine="vllm-cpu" if not torch.cuda.is_available() else "vllm",
                compilation_mode=str(llm.llm_engine.vllm_config.compilation_config.mode), quick=quick)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"vllm-{device_slug(info)}-{info['date'][:10]}{'-quick' if quick else ''}.json")
    with open(path, "w") as f:
        json.dump({"meta": info, "rows": rows}, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
