"""Static performance record of every shipped Triton config, compiled for sm_90a without a GPU.

python -m bench.static_report [--subset] [--jobs N] [--out DIR] [--json FILE] [--no-cache] [--atomic-dq]

The host code of each op (attention forward/backward/decode, glu, neuron_stats, head_steer) is called on meta
tensors with every kernel launch recorded, so the configs, constexprs and argument values are exactly the ones
the code ships (autotuned launches expand to one compile per config of their table). Each launch is then
specialised as the JIT would (16-byte aligned pointers, tt.divisibility=16 on ints divisible by 16, ints equal
to 1 as constexprs), compiled with triton.compile for GPUTarget("cuda", 90, 32), and read back: registers and
spill bytes from ptxas -v, shared memory from the metadata, wgmma vs mma.sync and cp.async from the PTX.
Results are cached by triton version + kernel source hash (JITFunction.cache_key) + specialisation.
Variant `<variant>+atomic-dq`: the backward's dK/dV kernel on the opt-in atomic-dQ path (XLKERNELS_DETERMINISTIC=0).
"""
import argparse
import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature
from triton.tools.tensor_descriptor import TensorDescriptor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # max dynamic shared memory per block on sm_90
HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
VARIANTS = ("plain", "full")
# The default test's set: each config of each table once (one head dim per bucket), all features on, bf16.
SUBSET = dict(dims=(64, 128, 256), dtypes=(torch.bfloat16,), variants=("full",))
FIGURES = 3  # bump when compile_one's figures change (part of the cache key)
# Shapes of the recorded launches (they set the argument values, i.e. which ints get divisibility hints).
PREFILL = dict(B=2, H=32, Hkv=8, T=2048)  # q/k/v in HF layout: (B, T, H, D) memory viewed as (B, H, T, D)
DECODE = dict(B=8, H=32, Hkv=8, T=1, S=4096)
GLU = dict(N=4096, I=8192, G=4)
META = "meta"


# ------------------------------------------------------------------ recording launches


class _Launch:
    """Stands in for a kernel (or an autotuned kernel) during recording: kernel[grid](...) records the call."""

    def __init__(self, jit, configs, calls, tag):
        self.jit, self.configs, self.calls, self.tag = jit, configs, calls, tag

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.tag, self.jit, self.configs, args, kw))


def _modules():
    from xlkernels.triton import (attention, attention_bwd, attention_common, attention_decode, attention_tma, glu,
                                  head_steer, neuron_stats)
    mods = (attention_common, attention, attention_bwd, attention_decode, attention_tma, glu, head_steer, neuron_stats)
    if attention_common.INTERP or not isinstance(attention._fwd_kernel, JITFunction):
        raise RuntimeError("xlkernels.triton was imported under TRITON_INTERPRET=1; run this in a process "
                           "without it (python -m bench.static_report)")
    return mods


@contextlib.contextmanager
def _recording(calls, tag):
    """Swap every module-level kernel / autotuner for a recorder, and the autotune helper for one that records
    the config table it is given."""
    mods = _modules()
    saved = []
    for m in mods:
        for name, obj in list(vars(m).items()):
            if isinstance(obj, JITFunction):
                saved.append((m, name, obj))
                setattr(m, name, _Launch(obj, None, calls, tag))
            elif isinstance(obj, Autotuner):
                saved.append((m, name, obj))
                setattr(m, name, _Launch(obj.fn, obj.configs, calls, tag))
    common = mods[0]  # attention_common.launch looks _tuned up there
    saved.append((common, "_tuned", common._tuned))
    common._tuned = lambda kernel, table, bucket, reset=(): _Launch(getattr(kernel, "jit", kernel), table[bucket],
                                                                 calls, tag)
    try:
        yield
    finally:
        for m, name, obj in reversed(saved):
            setattr(m, name, obj)


@contextlib.contextmanager
def _setting(mod, name, value):
    """A module-level switch (attention_tma.MODE, attention_bwd.DETERMINISTIC) set for the recording."""
    saved = getattr(mod, name)
    setattr(mod, name, value)
    try:
        yield
    finally:
        setattr(mod, name, saved)


def _hf(B, H, T, D, dtype):
    """(B, H, T, D) view of (B, T, H, D) memory, as q/k/v come out of HF projections."""
    return torch.empty(B, T, H, D, dtype=dtype, device=META).transpose(1, 2)


def _attention_calls(D, dtype, variant, decode, calls):
    from xlkernels.triton import attention, attention_bwd
    full = variant == "full"
    p = DECODE if decode else PREFILL
    B, H, Hkv, T = p["B"], p["H"], p["Hkv"], p["T"]
    S = p.get("S", T)
    q, k, v = _hf(B, H, T, D, dtype), _hf(B, Hkv, S, D, dtype), _hf(B, Hkv, S, D, dtype)
    gate = torch.empty(B, H, dtype=dtype, device=META) if full else None
    shift = torch.empty(H, D, dtype=dtype, device=META).expand(B, H, D) if full else None
    kpm = torch.empty(B, S, dtype=torch.bool, device=META) if full else None
    window, softcap = (512, 50.0) if full else (0, 0.0)
    fwd = (q, k, v, gate, shift, kpm, True, D ** -0.5, window, softcap)
    from xlkernels.triton import attention_tma
    for mode in ("0",) if decode else ("1", "0"):  # prefill: the TMA (Hopper) and the pointer forward
        with _recording(calls, "decode" if decode else "fwd"), _setting(attention_tma, "MODE", mode):
            out, o_raw, lse = attention.forward(*fwd, False, full)
    if decode:
        return
    do = torch.empty_like(out)
    with _recording(calls, "bwd"):
        attention_bwd.backward(do, q, k, v, out, o_raw, lse, *fwd[3:], True, True, full, full)


def _mlp_calls(dtype, variant, calls):
    from xlkernels.triton import glu, head_steer, neuron_stats
    N, I, G = GLU["N"], GLU["I"], GLU["G"]
    full = variant == "full"
    x = torch.empty(N, I, dtype=dtype, device=META)
    ids = torch.empty(N, dtype=torch.int64, device=META) if full else None
    i64, f64 = dict(dtype=torch.int64, device=META), dict(dtype=torch.float64, device=META)
    stats = (torch.empty(G, **i64), torch.empty(G, I, **i64), torch.empty(G, I, **f64), torch.empty(G, I, **f64),
             torch.empty(G, I, dtype=torch.float32, device=META))
    iv = torch.empty(G, I, dtype=torch.float32, device=META) if full else None
    act = "gelu_tanh" if full else "silu"
    with _recording(calls, "glu"):
        glu.forward(x, x, act, ids, iv, iv, stats if full else None)
        glu.backward(x, x, x, act, ids, iv, iv)
    if full:
        with _recording(calls, "neuron_stats"):
            neuron_stats.accumulate(x, ids, *stats)
    B, T, H, D = 2, 2048, 32, 128
    o = torch.empty(B, T, H, D, dtype=dtype, device=META)
    g = torch.empty(B, H, dtype=dtype, device=META) if full else None
    s = torch.empty(H, D, dtype=dtype, device=META) if full else None
    with _recording(calls, "head_steer"):
        head_steer.forward(o, g, s)
        if full:
            head_steer.backward(o, o, g, s, True, True, True)


# ------------------------------------------------------------------ compile jobs


def _mock(a):
    if isinstance(a, TensorDescriptor):  # a copy: configs set their own block shapes on the shared one
        return TensorDescriptor(MockTensor(a.base.dtype), a.shape, a.strides, list(a.block_shape))
    return MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a


_BINDERS = {}


def _specialise(jit, args, kw):
    """(signature, constexprs, attrs, options) as JITFunction.run builds them for these arguments (the same
    triton internals: create_function_from_signature, then _pack_args)."""
    backend = make_backend(TARGET)
    if jit not in _BINDERS:
        _BINDERS[jit] = create_function_from_signature(jit.signature, jit.params, backend)
    kw = {k: _mock(v) for k, v in kw.items()}
    bound, spec, opts = _BINDERS[jit](*map(_mock, args), **kw)
    options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, opts)
    return signature, constexprs, attrs, options


_BLOCK_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_R", "BLOCK_I", "BLOCK_T", "BLOCK_D", "PACK", "WS", "HOIST")


def jobs(dims=HEAD_DIMS, dtypes=DTYPES, variants=VARIANTS, atomic_dq=True):
    """Every (kernel, variant, D, dtype, config) the code ships, as compile jobs. atomic_dq: also the dK/dV kernel
    of the opt-in atomic-dQ backward (XLKERNELS_DETERMINISTIC=0), as variant `<variant>+atomic-dq`."""
    from xlkernels.triton import attention_bwd
    out = []
    for dtype in dtypes:
        dt = str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp", "bf")
        for variant in variants:
            recs = []
            for D in dims:
                calls = []
                _attention_calls(D, dtype, variant, False, calls)
                _attention_calls(D, dtype, variant, True, calls)
                recs += [(D, variant, c) for c in calls]
                if atomic_dq:
                    calls = []
                    with _setting(attention_bwd, "DETERMINISTIC", False):
                        _attention_calls(D, dtype, variant, False, calls)
                    calls = [c for c in calls if c[0] == "bwd" and c[1].__name__ == "_bwd_dkdv_kernel"]
                    assert calls and all(c[4]["ATOMIC_DQ"] for c in calls), "atomic dQ path not taken"
                    recs += [(D, variant + "+atomic-dq", c) for c in calls]
            calls = []
            _mlp_calls(dtype, variant, calls)
            recs += [(None, variant, c) for c in calls]
            for D, var, (tag, jit, configs, args, kw) in recs:
                for cfg in configs or [None]:
                    k = dict(kw)
                    if cfg is not None:
                        k.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                        if cfg.pre_hook:  # TMA: the descriptors' boxes follow the config
                            cfg.pre_hook({**dict(zip(jit.arg_names, args)), **k})
                    sig, const, attrs, options = _specialise(jit, args, k)
                    blocks = {n: k[n] for n in _BLOCK_KEYS if n in k}
                    out.append(dict(kernel=f"{jit.__module__.rsplit('.', 1)[-1]}.{jit.__name__}", op=tag,
                                    variant=var, D=D, dtype=dt, blocks=blocks, warps=options.num_warps,
                                    stages=options.num_stages, autotuned=cfg is not None,
                                    _job=(jit, sig, const, attrs, options)))
    return out


def _key(job):
    jit, sig, const, attrs, options = job
    src = ASTSource(jit, sig, const, attrs)
    opts = {k: v for k, v in sorted(options.__dict__.items()) if k != "extern_libs"}
    return hashlib.sha256(f"{FIGURES}|{triton.__version__}|{TARGET}|{src.hash()}|{opts}".encode()).hexdigest()


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def loop_spills(cubin):
    """(bytes stored, bytes loaded) by local-memory (spill) instructions STL/LDL inside loops of the SASS, a loop
    being the span of a backward branch. (ptxas -v only gives the kernel's totals.)"""
    import tempfile
    tool = knobs_tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    insns = [(int(a, 16), text) for a, text in _INSN.findall(sass)]
    loops = []
    for addr, text in insns:
        m = re.search(r"\bBRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    st = ld = 0
    for addr, text in insns:
        m = re.search(r"\b(STL|LDL)((?:\.\w+)*)", text)
        if m and any(lo <= addr <= hi for lo, hi in loops):
            bits = re.findall(r"\d+", m.group(2))  # .64, .128, .U8, .S16 ...; none: 32 bits
            n = int(bits[-1]) // 8 if bits else 4
            st, ld = (st + n, ld) if m.group(1) == "STL" else (st, ld + n)
    return st, ld


def knobs_tool(name):
    from triton import knobs
    tool = getattr(knobs.nvidia, name, None)
    return tool.path if tool is not None else name


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(job):
    """Compile one job; -> its figures."""
    jit, sig, const, attrs, options = job
    from triton import knobs
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by triton
    knobs.compilation.always_compile = True  # else a triton cache hit skips ptxas and prints nothing
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        k = triton.compile(ASTSource(jit, sig, const, attrs), target=TARGET, options=options.__dict__)
    secs = time.perf_counter() - t0
    text = log.getvalue()
    m = _PTXAS.search(text)
    regs = re.search(r"Used (\d+) registers", text)
    ptx = k.asm["ptx"]
    if m is None or regs is None or ".target sm_90a" not in ptx:
        raise RuntimeError(f"unexpected ptxas output / target for {jit.__name__}:\n{text[-2000:]}")
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
    loads = "tma" if "cp.async.bulk.tensor" in ptx else "cp.async" if "cp.async" in ptx else "-"
    loop_st, loop_ld = loop_spills(k.asm["cubin"])
    threads = re.search(r"\.reqntid (\d+)", ptx)
    return dict(regs=int(regs.group(1)), stack=int(m.group(1)), spill_stores=int(m.group(2)),
                spill_loads=int(m.group(3)), loop_spill_stores=loop_st, loop_spill_loads=loop_ld,
                smem=int(k.metadata.shared), mma=mma, async_loads=loads, compile_s=round(secs, 2),
                warp_spec="ttg.warp_specialize" in k.asm["ttgir"], threads=int(threads.group(1)) if threads else None)


def _cache_path():
    base = os.environ.get("XLKERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "xlkernels"))
    return os.path.join(base, "static_report.json")


def _save(path, cache):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(cache, f)
    os.replace(path + ".tmp", path)


_FORKED = []


def _compile_forked(i):
    return compile_one(_FORKED[i])


FIGURE_FIELDS = ("regs", "stack", "spill_stores", "spill_loads", "loop_spill_stores", "loop_spill_loads", "smem", "mma",
                 "async_loads", "compile_s", "warp_spec", "threads")


def record_figures(path):
    """{compile key: figures} of a record written by this script. Its rows count as compiled for a job whose key
    (FIGURES, triton version, target, the kernel's source with its callees, signature, constants, options) is
    the same: what the compiler would do again."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {r["key"]: {k: r[k] for k in FIGURE_FIELDS} for r in rows}


def run(rows, use_cache=True, workers=1, reuse=None):
    """Fill each row's figures: cached ones, then those of `reuse` ({key: figures}, e.g. the committed record),
    the rest compiled (`workers` processes; triton's own cache goes to a temporary directory). use_cache=False
    neither reads nor writes the cache."""
    import tempfile
    from triton import knobs
    path = _cache_path()
    cache = {}
    if use_cache and os.path.exists(path):
        with open(path) as f:
            cache = json.load(f)
    todo = {}
    for r in rows:
        r["key"] = _key(r["_job"])
        if r["key"] not in cache and reuse and r["key"] in reuse:
            cache[r["key"]] = reuse[r["key"]]
        if r["key"] not in cache:
            todo.setdefault(r["key"], r["_job"])
    with tempfile.TemporaryDirectory() as tmp:
        knobs.cache.dir = tmp
        pool = None
        _FORKED[:] = todo.values()
        if workers > 1 and len(todo) > 1:  # forked workers get the jobs by index (kernels do not pickle)
            import multiprocessing as mp
            pool = mp.get_context("fork").Pool(workers)
        figs = (pool.imap if pool else map)(_compile_forked, range(len(todo)))
        for n, (key, f) in enumerate(zip(todo, figs)):
            cache[key] = f
            print(f"[{n + 1}/{len(todo)}] {f['compile_s']} s", file=sys.stderr, flush=True)
            if use_cache and (n % 10 == 9 or n == len(todo) - 1):
                _save(path, cache)
        if pool:
            pool.close()
    for r in rows:
        r.update(cache[r["key"]])
        del r["_job"]
    return rows, len(todo)


# ------------------------------------------------------------------ checks and output


def ident(r):
    """Row identity across runs: kernel, variant, D, dtype, config."""
    b = ",".join(f"{k}={v}" for k, v in sorted(r["blocks"].items()))
    return f"{r['kernel']}|{r['variant']}|D={r['D']}|{r['dtype']}|{b}|w{r['warps']}|s{r['stages']}"


def problems(rows, allowed=None, record=None, allowed_loads=None):
    """Failures: spill stores inside a loop beyond allowed ({ident: bytes}), spill reloads inside a loop beyond
    allowed_loads (same form), shared memory over 227 KB, wgmma or TMA lost where the record (rows of a previous
    run) had it, a config asking for warp specialisation (WS) that the compiler did not apply. Spills outside
    loops are reported, not failed."""
    allowed = allowed or {}
    allowed_loads = allowed_loads or {}
    had_wgmma = {ident(r) for r in record or () if r.get("mma") == "wgmma"}
    had_tma = {ident(r) for r in record or () if r.get("async_loads") == "tma"}
    out = []
    for r in rows:
        i = ident(r)
        if r["loop_spill_stores"] > allowed.get(i, 0):
            out.append(f"{i}: {r['loop_spill_stores']} B of spill stores inside loops (total {r['spill_stores']} "
                       f"B stores / {r['spill_loads']} B loads)")
        if r["loop_spill_loads"] > allowed_loads.get(i, 0):
            out.append(f"{i}: {r['loop_spill_loads']} B of spill reloads inside loops (total {r['spill_stores']} "
                       f"B stores / {r['spill_loads']} B loads)")
        if r["smem"] > SMEM_LIMIT:
            out.append(f"{i}: {r['smem']} B shared memory > {SMEM_LIMIT}")
        if i in had_wgmma and r["mma"] != "wgmma":
            out.append(f"{i}: {r['mma']} where the record had wgmma")
        if i in had_tma and r["async_loads"] != "tma":
            out.append(f"{i}: {r['async_loads']} loads where the record had TMA")
        if r["blocks"].get("WS") and not r.get("warp_spec"):
            out.append(f"{i}: warp specialisation requested, not applied by the compiler")
    return out


REGS_PER_SM, SMEM_PER_SM, SMEM_PER_CTA_RESERVED, MAX_WARPS, MAX_CTAS = 65536, 228 * 1024, 1024, 64, 32


def occupancy(r):
    """Resident warps per SM on sm_90 (H100/H200) from registers and shared memory alone: registers are allocated
    per warp in units of 256 (8 per thread), 64K per SM; shared memory is 228 KB per SM with 1 KB reserved per
    CTA; at most 32 CTAs and 64 warps. (setmaxnreg, which warp-specialised kernels may use, is ignored.)"""
    warps = (r.get("threads") or 32 * r["warps"]) // 32
    per_warp = -(-r["regs"] * 32 // 256) * 256
    ctas = min(REGS_PER_SM // (per_warp * warps), SMEM_PER_SM // (r["smem"] + SMEM_PER_CTA_RESERVED), MAX_CTAS,
               MAX_WARPS // warps)
    return ctas * warps


def _commit():
    try:
        h = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout
        return (h.strip() or "unknown") + ("+dirty" if dirty.strip() else "")
    except OSError:
        return "unknown"


def meta(seconds, compiled):
    return dict(triton=triton.__version__, torch=torch.__version__, target="sm_90a (GPUTarget cuda 90, warp 32)",
                commit=_commit(), date=datetime.date.today().isoformat(), prefill=PREFILL, decode=DECODE, glu=GLU,
                wall_s=round(seconds, 1), compiled=compiled, smem_limit=SMEM_LIMIT)


def _cfg(r):
    b = " ".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in r["blocks"].items()
                 if k not in ("BLOCK_D", "WS", "HOIST"))
    b += " WS" if r["blocks"].get("WS") else ""
    b += " no-hoist" if r["blocks"].get("HOIST") is False else ""
    return f"{b} w{r['warps']} s{r['stages']}"


def markdown(m, rows):
    rows = sorted(rows, key=lambda r: (r["kernel"], r["D"] or 0, r["dtype"], r["variant"]))  # stable: config order
    spill = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    loop = [r for r in spill if r["loop_spill_stores"] or r["loop_spill_loads"]]
    mma = [r for r in rows if r["mma"] != "-"]
    sync = sorted({f"{r['kernel']} D{r['D']} {_cfg(r)}" for r in mma if r["mma"] == "mma.sync"})
    n_wg = sum(1 for r in mma if r["mma"] == "wgmma")
    big = max(rows, key=lambda r: r["smem"])
    lines = [
        "# Static record of the shipped Triton configs (sm_90a)",
        "",
        f"Generated by `python -m bench.static_report`: triton {m['triton']}, torch {m['torch']}, commit "
        f"{m['commit']}, {m['date']}; {len(rows)} kernels, {sum(r['compile_s'] for r in rows):.0f} s of compiling "
        f"when cold (this run: {m['compiled']} compiled, the rest cached, {m['wall_s']} s). "
        "No GPU: each launch the host code makes is compiled with the JIT's specialisation for sm_90a.",
        f"Launch shapes: prefill {m['prefill']} (q/k/v in HF layout), decode {m['decode']}, glu/stats {m['glu']}.",
        "Variants: `plain` = causal attention, no steering, silu glu without stats; `full` = causal + window 512 + "
        "softcap + key padding mask + gate + shift + gate/shift grads, gelu glu with group ids, stats and a "
        "per-group intervention.",
        "",
        f"- {len(spill)} kernels spill; {sum(1 for r in loop if r['loop_spill_stores'])} store spills inside a loop, "
        f"{sum(1 for r in loop if r['loop_spill_loads'])} reload spilled values inside a loop (bold in the table):"
        + "".join(f"\n  - `{ident(r)}`: {r['loop_spill_stores']} B stores / {r['loop_spill_loads']} B loads inside "
                  f"loops ({r['spill_stores']} / {r['spill_loads']} B in all, {r['regs']} regs)" for r in loop),
        f"- largest shared memory: {big['smem'] / 1024:.1f} KB (`{ident(big)}`; limit {SMEM_LIMIT // 1024} KB); "
        f"{sum(1 for r in rows if r['smem'] > 192 * 1024)} kernels above 192 KB.",
        f"- MMA: {n_wg} kernels use wgmma, {len(mma) - n_wg} mma.sync:" + "".join(f"\n  - {x}" for x in sync),
        f"- loads: {sum(1 for r in rows if r['async_loads'] == 'tma')} kernels through TMA descriptors, "
        f"{sum(1 for r in rows if r['async_loads'] == 'cp.async')} cp.async; "
        f"{sum(1 for r in rows if r.get('warp_spec'))} warp-specialised ("
        + ", ".join(sorted({f"{r['threads']} threads" for r in rows if r.get('warp_spec')})) + ").",
        "",
        "`warps/SM`: resident warps per SM on an H100/H200 from registers and shared memory alone "
        "(`bench.static_report.occupancy`).",
        "",
        "| kernel | variant | D | dtype | blocks | warps | stages | regs | spill st/ld (in loops) B | smem KB | "
        "warps/SM | MMA | loads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = _cfg(r).rsplit(" w", 1)[0]
        sp = "0"
        if r["spill_stores"] or r["spill_loads"]:
            sp = f"{r['spill_stores']}/{r['spill_loads']} ({r['loop_spill_stores']}/{r['loop_spill_loads']})"
            sp = f"**{sp}**" if r["loop_spill_stores"] or r["loop_spill_loads"] else sp
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['D'] or '-'} | {r['dtype']} | {b} | {r['warps']} | "
                     f"{r['stages']} | {r['regs']} | {sp} | {r['smem'] / 1024:.1f} | {occupancy(r)} | {r['mma']} | "
                     f"{r['async_loads']}{' + warp-specialised' if r.get('warp_spec') else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.static_report", description=__doc__.splitlines()[0])
    p.add_argument("--subset", action="store_true", help=f"only {SUBSET} (the default test's set)")
    p.add_argument("--jobs", type=int, default=1, help="compile processes (default 1)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "static"),
                   help="directory for sm90a.md and sm90a.json (default bench/results/static)")
    p.add_argument("--json", default=None, help="write only this JSON file (no Markdown)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--reuse", default=None, metavar="RECORD",
                   help="take the figures of jobs whose compile key is in this record (e.g. the committed "
                        "sm90a.json) instead of compiling them again; changed kernels still compile")
    p.add_argument("--atomic-dq", action="store_true",
                   help="only the dK/dV rows of the non-deterministic atomic-dQ backward (XLKERNELS_DETERMINISTIC=0), "
                        "variant `<variant>+atomic-dq` (the default run records them too)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the real launch paths (kernels are imported after this)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    t0 = time.perf_counter()
    rows = jobs(**SUBSET) if args.subset else jobs()
    if args.atomic_dq:
        rows = [r for r in rows if r["variant"].endswith("+atomic-dq")]
    reuse = record_figures(args.reuse) if args.reuse else None
    rows, compiled = run(rows, use_cache=not args.no_cache, workers=args.jobs, reuse=reuse)
    m = meta(time.perf_counter() - t0, compiled)
    doc = {"meta": m, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(args.json)
        return 0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sm90a.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(args.out, "sm90a.md"), "w") as f:
        f.write(markdown(m, rows))
    print(f"{len(rows)} kernels ({m['compiled']} compiled) in {m['wall_s']} s -> {args.out}/sm90a.md")
    bad = problems(rows)
    if bad:
        print("spill stores or reloads inside loops / shared memory over the limit (tests/test_static_report.py "
              "allow-lists known ones):\n  " + "\n  ".join(bad))
    return 0


if __name__ == "__main__":
    sys.exit(main())
