"""Shared benchmark helpers: timing, ceilings, memory, and result files.

Timing: `timeit(fn, warmup, rep)` -> {"p50", "p20", "p80"} in ms. On CUDA each repetition is timed with CUDA
events after an L2 flush (as triton.testing.do_bench does); on CPU with time.perf_counter. `warmup` and `rep`
are call counts on both. Results go through `record(rows, name)` to
bench/results/<device-slug>-<YYYY-MM-DD>-<name>.json as {"meta": device_info(), "rows": [...]}; each row has
op, provider, mode, shape, metric, p50, p20, p80 (+ any extra keys). See bench/README.md.
"""
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
REQUIRED = ("op", "provider", "mode", "shape", "metric", "p50")
LOWER_IS_BETTER = {"ms", "s", "us", "MB", "GB"}  # other metrics (GB/s, TFLOP/s, tokens/s, x) are higher-better


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _quantiles(times_ms: list) -> dict:
    xs = sorted(times_ms)
    if len(xs) == 1:
        return {"p50": xs[0], "p20": xs[0], "p80": xs[0]}
    q = statistics.quantiles(xs, n=10, method="inclusive")  # deciles: q[1]=20%, q[7]=80%
    return {"p50": statistics.median(xs), "p20": q[1], "p80": q[7]}


_flush_buf = None


def _flush_l2():
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    _flush_buf.zero_()


def timeit(fn, warmup: int = 5, rep: int = 20, *, device=None, budget_s: "float | None" = None,
           flush_l2: bool = True, grad_to_none=None, clock: str = "wall") -> dict:
    """Time `fn()`; returns {"p50", "p20", "p80"} in milliseconds over `rep` calls after `warmup` calls.

    device: where fn runs (default: cuda if available). budget_s: stop repeating once this many seconds are
    spent (at least 3 timed calls). grad_to_none: tensors whose .grad is reset before each call (backward).
    clock (CPU only): "wall" (perf_counter) or "cpu" (process CPU time: robust when other jobs share the cores;
    use it with torch.set_num_threads(1), since idle-spinning worker threads would be counted).
    """
    device = torch.device(device) if device is not None else default_device()
    cuda = device.type == "cuda"
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and cuda:
        raise ValueError("clock='cpu' only applies to CPU timing")
    now = time.perf_counter if clock == "wall" else time.process_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def reset():
        for t in grad_to_none or ():
            t.grad = None

    for _ in range(warmup):
        reset()
        fn()
    sync()
    times, start = [], time.perf_counter()
    for i in range(rep):
        reset()
        if cuda:
            if flush_l2:
                _flush_l2()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t0 = now()
            fn()
            times.append((now() - t0) * 1e3)
        if budget_s is not None and i >= 2 and time.perf_counter() - start > budget_s:
            break
    return _quantiles(times)


def rate(t: dict, amount: float, unit_scale: float = 1e9) -> dict:
    """Convert a timeit dict (ms) to a rate: amount per second / unit_scale (p20 of the rate uses p80 time)."""
    f = lambda ms: amount / (ms * 1e-3) / unit_scale if ms > 0 else float("inf")  # noqa: E731
    return {"p50": f(t["p50"]), "p20": f(t["p80"]), "p80": f(t["p20"])}


def memory(fn, device=None) -> "float | None":
    """Peak extra memory (MB) while running fn() once. CUDA: max_memory_allocated above the starting
    allocation. CPU: peak RSS growth (Linux, via /proc/self/clear_refs; approximate: the allocator may reuse
    freed memory). None when it cannot be measured."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _proc_status_kb("VmRSS")
        fn()
        return max(0.0, (_proc_status_kb("VmHWM") - base) / 1024)
    except OSError:
        return None


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _git(*args) -> "str | None":
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> "str | None":
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def device_info(device=None) -> dict:
    """Device, software versions, commit (with dirty flag) and date of this run."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": " ".join(sys.argv),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def device_slug(info: "dict | None" = None) -> str:
    info = info or device_info()
    name = info["device"].lower().replace("(r)", "").replace("(tm)", "")
    name = re.sub(r"\bcpu\b|@.*$", "", name)
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40].strip("-")
    if info.get("device_type") == "cpu":
        slug = f"cpu-{slug}" if slug else "cpu"
    return slug or "unknown"


def copy_bandwidth(device=None, nbytes: "int | None" = None, rep: int = 20, clock: str = "wall") -> dict:
    """Device copy bandwidth in GB/s (bytes read + written by dst.copy_(src)): {"p50", "p20", "p80"}."""
    device = torch.device(device) if device is not None else default_device()
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**27
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), warmup=3, rep=rep, device=device, flush_l2=False, clock=clock)
    return rate(t, 2 * nbytes)


def matmul_tflops(device=None, dtype=torch.bfloat16, n: "int | None" = None, rep: int = 10) -> dict:
    """Dense matmul throughput (TFLOP/s) of an n x n x n product in `dtype`: {"p50", "p20", "p80"}."""
    device = torch.device(device) if device is not None else default_device()
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = timeit(lambda: a @ b, warmup=2, rep=rep, device=device, flush_l2=False)
    return rate(t, 2 * n**3, 1e12)


def row(op, provider, mode, shape, metric, t: dict, **extra) -> dict:
    """One result row from a timeit/rate dict."""
    return {"op": op, "provider": provider, "mode": mode, "shape": shape, "metric": metric,
            "p50": t["p50"], "p20": t.get("p20", t["p50"]), "p80": t.get("p80", t["p50"]), **extra}


def shape_key(shape) -> str:
    """Rows' shape as a string (dicts as k=v pairs in their given order)."""
    if isinstance(shape, dict):
        return ",".join(f"{k}={v}" for k, v in shape.items())
    if isinstance(shape, (list, tuple)):
        return "x".join(map(str, shape))
    return str(shape)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    return x


def record(rows: list, name: str, *, out_dir: "str | None" = None, meta: "dict | None" = None) -> str:
    """Write rows to <out_dir>/<device-slug>-<YYYY-MM-DD>-<name>.json (overwriting a same-day file); returns
    the path. Rows need op, provider, mode, shape, metric, p50 (p20/p80 default to p50)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"name must be letters, digits, '_', '.' or '-', got {name!r}")
    out = []
    for i, r in enumerate(rows):
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise ValueError(f"rows[{i}] lacks {missing}: {r}")
        out.append({"p20": r["p50"], "p80": r["p50"], **r})
    info = {**device_info(), **(meta or {})}
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    day = info["date"][:10]
    path = os.path.join(out_dir, f"{device_slug(info)}-{day}-{name}.json")
    with open(path, "w") as f:
        json.dump(_clean({"meta": info, "rows": out}), f, indent=1)
        f.write("\n")
    return path


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def ratio(rows: list, baseline: str, *, key=("op", "mode", "shape", "metric")) -> list:
    """Copies of rows with "speedup" vs the `baseline` provider's row of the same key (p50 based; > 1 means
    better than baseline, for both lower-better metrics like ms and higher-better ones like GB/s)."""
    base = {}
    for r in rows:
        if r["provider"] == baseline:
            base[tuple(shape_key(r[k]) if k == "shape" else r[k] for k in key)] = r["p50"]
    out = []
    for r in rows:
        b = base.get(tuple(shape_key(r[k]) if k == "shape" else r[k] for k in key))
        s = None
        if b is not None and r["p50"] and b:
            s = b / r["p50"] if r["metric"] in LOWER_IS_BETTER else r["p50"] / b
        out.append({**r, "speedup": s})
    return out


def quick_arg(argv) -> bool:
    return "--quick" in (argv or [])


def llama_model(device, dtype, quick, cpu: dict, attn_implementation: str = "sdpa"):
    """Random-init Llama (seed 0) for model-level benches: Llama-3-8B layer sizes on CUDA, `cpu` sizes (hidden_size,
    num_attention_heads, num_key_value_heads, intermediate_size, vocab_size) elsewhere; 2 layers if quick else 4.
    Returns (model in eval mode, label)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if device.type == "cuda":
        cpu = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                   vocab_size=32000)
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    cfg = {k: cpu[k] for k in keys}  # label order: ..., num_hidden_layers, vocab_size
    cfg.update(num_hidden_layers=2 if quick else 4, vocab_size=cpu["vocab_size"])
    config = LlamaConfig(**cfg, max_position_embeddings=8192, attn_implementation=attn_implementation)
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model, "llama-" + ",".join(f"{k}={v}" for k, v in cfg.items())
