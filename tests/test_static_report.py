"""Static check of the shipped Triton configs on sm_90a, no GPU needed (bench/static_report.py compiles them).

Fails when a config stores spills inside a loop of its SASS or reloads spilled values there (ptxas -v only gives
totals; the report finds the STL / LDL instructions inside backward-branch spans, outer loops included), needs more
than 227 KB of shared memory, or no longer uses wgmma where the committed record (bench/results/static/sm90a.json)
says it did. Spills outside loops are listed in the record but do not fail. The allow-lists below only shrink: an
entry above its kernel's figure fails too (lower it), and in the full run so does an entry naming no kernel.
`make test` compiles a subset (each config once: one head dim per bucket, bf16, all features on; ~2 min cold,
seconds when cached) and checks that the committed record holds the same figures for the same compile keys, so
the record is current and is what the compiler gives. `make static-check` (XLK_STATIC_FULL=1) checks every shipped config (396 today): it takes the
record's figures for jobs whose compile key (triton version, target, kernel source with its callees, signature,
constants, options) is unchanged and compiles the rest (all of them, 12-17 min on 2 cores, when the record is
stale or XLK_STATIC_REUSE=0). Both include the TMA forward and the opt-in atomic-dQ dK/dV kernel (`+atomic-dq`).
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.static
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(ROOT, "bench", "results", "static", "sm90a.json")
FULL = os.environ.get("XLK_STATIC_FULL") == "1"
REUSE = FULL and os.environ.get("XLK_STATIC_REUSE", "1") == "1"

# Known offenders in the shipped configs (triton 3.9.0, 2026-11-30): bytes of spill stores inside loops, the
# same for fp16 and bf16 ({} = dtype). Lower a figure when a kernel improves; never raise one silently.
_KNOWN = {
    # empty since 2026-11-30 (bench/NOTES.md, "Hopper static pass"): the 12 offenders were the glu/neuron_stats
    # per-element atomic path (208 B / 28 B), forward M128 N128 w8 at D 64/128 (48 B / 4 B, config dropped) and
    # dK/dV M16 N32 w4 at D 256 (20 B / 56 B, config replaced by M16 N64 w8 on wgmma).
}
# Known spill reloads inside loops (LDL), the same way. Empty since issue 19 §2 (bench/NOTES.md, "dK/dV without
# spill traffic in its loops"): 84 dK/dV rows (D 64-256, deterministic and atomic-dQ tables) reloaded 4-212 B per
# thread in their GQA head loop, once per head, from the three pipeline prologues of its query-block loops.
_KNOWN_LOADS = {}
ALLOWED = {k.format(dt): v for k, v in _KNOWN.items() for dt in ("fp16", "bf16")}
ALLOWED_LOADS = {k.format(dt): v for k, v in _KNOWN_LOADS.items() for dt in ("fp16", "bf16")}


def stale(rows, allowed, field, full):
    """Allow-list entries to lower or drop: above their kernel's `field` now, or (full run) naming no kernel."""
    from bench.static_report import ident
    now = {ident(r): r[field] for r in rows}
    return [f"{i}: allowed {b} B of {field}, now {now.get(i, 'no such kernel')}" for i, b in allowed.items()
            if (i in now and now[i] < b) or (full and i not in now)]


def test_allow_lists_only_shrink():
    """The ratchet on synthetic rows: an improved kernel or a vanished one makes its entry fail."""
    row = dict(kernel="attention_bwd._bwd_dkdv_kernel", variant="full", D=128, dtype="bf16",
               blocks={"BLOCK_M": 32, "BLOCK_N": 64}, warps=8, stages=3, loop_spill_loads=8)
    from bench.static_report import ident, problems
    i = ident(row)
    assert stale([row], {i: 8}, "loop_spill_loads", True) == []
    assert stale([row], {i: 16}, "loop_spill_loads", True)  # improved: lower the entry
    assert stale([], {i: 8}, "loop_spill_loads", True)  # gone (full run)
    assert stale([], {i: 8}, "loop_spill_loads", False) == []  # a subset run cannot tell
    r = dict(row, loop_spill_stores=0, spill_stores=8, spill_loads=8, smem=0, mma="wgmma")
    assert problems([r]) and not problems([r], allowed_loads={i: 8})


def test_shipped_configs_compile_clean(tmp_path):
    triton = pytest.importorskip("triton")
    # no side effects on import; compiling runs in a subprocess
    from bench.static_report import HEAD_DIMS, SUBSET, problems
    from xlkernels.triton.attention_common import _dbucket
    from xlkernels.triton.attention_bwd import DKDV_ATOMIC_CONFIGS
    with open(RECORD) as f:
        record = json.load(f)
    if triton.__version__ != record["meta"]["triton"]:
        pytest.skip(f"record and ALLOWED are for triton {record['meta']['triton']}, not {triton.__version__}")
    out = tmp_path / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.static_report", "--json", str(out)]
    cmd += ["--reuse", RECORD] if REUSE else [] if FULL else ["--subset"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= (300 if FULL else 45)
    dims = HEAD_DIMS if FULL else SUBSET["dims"]
    want = sum(len(DKDV_ATOMIC_CONFIGS[_dbucket(D)]) for D in dims) * (4 if FULL else 1)  # x dtypes x variants
    assert sum(r["variant"].endswith("+atomic-dq") for r in rows) == want
    if not FULL:   # compiled (or cached from a compile here): the committed record must hold the same figures
        from bench.static_report import FIGURE_FIELDS
        committed = {r["key"]: r for r in record["rows"]}
        same = [r for r in rows if r["key"] in committed]
        missing = [f"{r['kernel']} {r['variant']} D{r['D']}" for r in rows if r["key"] not in committed]
        assert not missing, ("kernels changed since the committed record: regenerate it (python -m "
                             "bench.static_report) and commit bench/results/static/. Not in it: " + ", ".join(missing))
        differ = [f"{r['kernel']} {r['variant']} D{r['D']}: {k} {committed[r['key']][k]} in the record, {r[k]} now"
                  for r in same for k in FIGURE_FIELDS if k != "compile_s" and r[k] != committed[r["key"]][k]]
        assert not differ, "the committed record does not match the compiler:\n" + "\n".join(differ)
    bad = problems(rows, ALLOWED, record["rows"], ALLOWED_LOADS)
    bad += stale(rows, ALLOWED, "loop_spill_stores", FULL) + stale(rows, ALLOWED_LOADS, "loop_spill_loads", FULL)
    assert not bad, "\n".join(bad)
