"""neuron_stats: every backend against the float64 reference on fresh random inputs."""
import pytest
import torch

import xlkernels
import xlkernels.ops.neuron_stats  # noqa: F401 (registers the op's backends)
from xlkernels import NeuronStats, backends
from xlkernels.reference import neuron_stats as ref
from xlkernels.triton import grids
from xlkernels.triton import neuron_stats as tns

pytestmark = pytest.mark.usefixtures("poison_memory")  # C++ outputs start as NaN

# The kernels under test (the reference backend is the ground truth itself; conftest fails the run without _C).
HERE = ["cpu"] + [b for b in ("triton",) if backends.why_not("neuron_stats", b, torch.device("cpu")) is None]
FIELDS = ("tokens", "positive", "sum", "sum_sq", "max")


def make_ids(pattern, shape, groups):
    n = int(torch.tensor(shape).prod())
    if pattern == "random":  # interleaved, with padding
        ids = torch.randint(-1, groups, (n,))
    elif pattern == "all_skip":
        ids = torch.full((n,), -1)
    elif pattern == "one":
        ids = torch.zeros(n, dtype=torch.long)
    elif pattern == "runs":  # per-sequence groups, left padding
        ids = torch.randint(0, groups, (n // 7 + 1,)).repeat_interleave(7)[:n]
        ids[::7] = -1
    elif pattern == "long_runs":  # runs of 37 rows (some -1): whole 16-row tiles share one id
        ids = torch.randint(-1, groups, (n // 37 + 1,)).repeat_interleave(37)[:n]
    elif pattern == "padded_seqs":  # bench_neuron_stats' ids: 32-row sequences, 8 left-padding rows each, so
        ids = torch.randint(0, groups, (n // 32 + 1,)).repeat_interleave(32)[:n]  # 16-row tiles of padding +
        ids[torch.arange(n) % 32 < 8] = -1  # one language (uniform path), and tiles across sequences
    elif pattern == "alternate":  # interleaved token by token within a sequence
        ids = torch.arange(n) % groups
    else:
        raise ValueError(pattern)
    return ids.reshape(shape)


def seeded(groups, nn, device="cpu"):
    """Stats with random non-zero prior content (poison-like: every element must be updated correctly)."""
    s = NeuronStats(torch.randint(0, 1000, (groups,)), torch.randint(0, 1000, (groups, nn)),
                    torch.randn(groups, nn, dtype=torch.float64), torch.rand(groups, nn, dtype=torch.float64) * 10,
                    torch.randn(groups, nn))
    return s.to(device)


def expected(act, ids, stats):
    want = stats.clone()
    ref.accumulate(act.double().reshape(-1, act.shape[-1]), ids.reshape(-1), want.tokens, want.positive, want.sum,
                   want.sum_sq, want.max)
    return want


# The Triton kernels sum each 16-row tile in fp32 before adding it in float64 (triton/neuron_stats.py): error at
# most 16 * 2**-24 of sum|x| (sum_sq: of sum x^2), whatever the number of rows.
TRITON_TILE_BOUND = 16 * 2.0 ** -24


def assert_stats(got, want, rtol=1e-12, backend=None, act=None, ids=None):
    """Counts and max exact; sum / sum_sq within rtol of the float64 reference, or for the triton backend (act and
    ids given) within TRITON_TILE_BOUND of sum|x| / sum x^2 of those rows."""
    assert torch.equal(got.tokens, want.tokens)
    assert torch.equal(got.positive, want.positive)
    assert torch.equal(got.max.isnan(), want.max.isnan())
    assert torch.equal(got.max.nan_to_num(), want.max.nan_to_num())
    scale = None
    if backend == "triton":
        a64 = act.double().reshape(-1, act.shape[-1]).nan_to_num(0.0, 0.0, 0.0)
        mag = expected(a64.abs(), ids, NeuronStats.empty(got.sum.shape[0], got.sum.shape[1]))
        scale = {"sum": mag.sum, "sum_sq": mag.sum_sq}
    for f in ("sum", "sum_sq"):
        a, b = getattr(got, f), getattr(want, f)
        assert torch.equal(a.isnan(), b.isnan()), f
        tol = rtol * b.abs()
        if scale is not None:
            tol = tol + TRITON_TILE_BOUND * scale[f]
        over = ((a - b).abs() - tol).nan_to_num(0.0)
        assert float(over.max()) <= 0.0, (f, float(((a - b).abs() / b.abs().clamp_min(1e-300)).max()))


def run(backend, act, ids, groups, stats=None):
    with xlkernels.backend(backend):
        return xlkernels.neuron_stats(act, ids, groups, stats=stats)


@pytest.mark.parametrize("backend", HERE)
@pytest.mark.parametrize("nn", [1, 13, 4099])
@pytest.mark.parametrize("pattern", ["random", "all_skip", "one", "runs", "long_runs", "alternate", "many"])
def test_matches_reference_fp32(backend, nn, pattern):
    groups = {"one": 1, "many": 50}.get(pattern, 4)
    n = 37 if nn > 1000 else 150
    act = torch.randn(n, nn) * 3
    ids = make_ids("random" if pattern == "many" else pattern, (n,), groups)
    stats = seeded(groups, nn)
    want = expected(act, ids, stats)
    got = run(backend, act, ids, groups, stats)
    assert got is stats
    assert_stats(got, want, backend=backend, act=act, ids=ids)


@pytest.mark.parametrize("backend", HERE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_3d(backend, dtype):
    act = (torch.randn(3, 29, 77) * 2).to(dtype)
    ids = make_ids("runs", (3, 29), 5)
    want = expected(act, ids, NeuronStats.empty(5, 77))
    got = run(backend, act, ids, 5)
    assert_stats(got, want, backend=backend, act=act, ids=ids)


@pytest.mark.parametrize("backend", HERE)
def test_non_contiguous_and_int32_ids(backend):
    base = torch.randn(40, 2 * 33)
    act = base[:, ::2]  # strided view
    ids = make_ids("random", (40,), 3).to(torch.int32)
    assert not act.is_contiguous()
    want = expected(act, ids, NeuronStats.empty(3, 33))
    assert_stats(run(backend, act, ids, 3), want, backend=backend, act=act, ids=ids)
    act_t = torch.randn(33, 40).t()  # transposed
    want = expected(act_t, ids, NeuronStats.empty(3, 33))
    assert_stats(run(backend, act_t, ids, 3), want, backend=backend, act=act_t, ids=ids)


@pytest.mark.parametrize("backend", HERE)
def test_streaming_equals_one_shot(backend):
    act, ids = torch.randn(90, 21), make_ids("random", (90,), 3)
    one = run(backend, act, ids, 3)
    s = None
    for lo, hi in ((0, 17), (17, 50), (50, 90)):
        s = run(backend, act[lo:hi], ids[lo:hi], 3, s)
    assert_stats(s, one, rtol=1e-13, backend=backend, act=act, ids=ids)


@pytest.mark.parametrize("backend", HERE)
def test_merge_equals_concatenation(backend):
    a1, i1 = torch.randn(30, 19), make_ids("random", (30,), 4)
    a2, i2 = torch.randn(25, 19) + 1, make_ids("runs", (25,), 4)
    merged = run(backend, a1, i1, 4).merge(run(backend, a2, i2, 4))
    a, i = torch.cat([a1, a2]), torch.cat([i1, i2])
    assert_stats(merged, run(backend, a, i, 4), rtol=1e-13, backend=backend, act=a, ids=i)


@pytest.mark.parametrize("backend", HERE)
def test_counters_past_2_31(backend):
    big = 2 ** 31 + 7
    act, ids = torch.randn(20, 9), make_ids("random", (20,), 2)
    stats = NeuronStats.empty(2, 9)
    stats.tokens.fill_(big)
    stats.positive.fill_(big)
    got = run(backend, act, ids, 2, stats)
    assert torch.equal(got.tokens - big, torch.bincount(ids[ids >= 0], minlength=2))
    for g in range(2):
        assert torch.equal(got.positive[g] - big, (act[ids == g] > 0).sum(0))


@pytest.mark.parametrize("backend", HERE)
def test_nan_policy(backend):
    act = torch.randn(12, 6)
    ids = torch.tensor([0, 0, 1, 1, 1, -1, 0, 1, 0, 0, 1, 1])
    act[1, 2] = float("nan")   # group 0, neuron 2
    act[5, 3] = float("nan")   # skipped row: no effect
    act[4, 4] = float("inf")
    act[7, 5] = -float("nan")  # negative NaN, group 1, neuron 5
    got = run(backend, act, ids, 2)
    want = expected(act, ids, NeuronStats.empty(2, 6))
    assert_stats(got, want, backend=backend, act=act, ids=ids)
    assert got.tokens.tolist() == [5, 6]  # NaN rows are still counted
    assert got.max[0, 2].isnan() and got.sum[0, 2].isnan() and got.sum_sq[0, 2].isnan()
    assert got.max[1, 5].isnan() and got.sum[1, 5].isnan()
    assert int(got.positive[0, 2]) == int((act[ids == 0, 2].nan_to_num(-1) > 0).sum())
    assert got.max[1, 4] == float("inf")
    assert int(got.max.isnan().sum()) == 2  # nothing else is NaN


def test_triton_error_does_not_grow_with_rows(monkeypatch):
    """Many identical 16-row tiles (the worst case: every tile rounds the same way): the fp32 tile partials stay
    within the stated bound of sum|x| however many rows (a fp32 running sum over 1.6e5 rows drifts ~1e-3)."""
    n = 160_000
    act = torch.full((n, 2), 0.1)
    act[:, 1] = 1.0 + 2.0 ** -20
    got = run("triton", act, torch.zeros(n, dtype=torch.long), 1)
    exact = n * act[0].double()
    err = (got.sum[0] - exact).abs() / exact
    assert float(err.max()) <= TRITON_TILE_BOUND, err
    assert float(((got.sum_sq[0] - n * act[0].double() ** 2).abs() / (n * act[0].double() ** 2)).max()) \
        <= TRITON_TILE_BOUND


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_float64_accumulation_precision(backend):
    n = 1_000_000
    act = torch.full((n, 2), 0.1)  # fp32 0.1; a float32 running sum would drift by ~1e-3 relative
    got = run(backend, act, torch.zeros(n, dtype=torch.long), 1)
    exact = n * float(torch.tensor(0.1, dtype=torch.float32))
    assert abs(float(got.sum[0, 0]) - exact) / exact < 1e-12


def test_bad_inputs():
    act, ids = torch.randn(6, 5), torch.tensor([0, 1, -1, 0, 1, 1])
    cases = [
        (lambda: xlkernels.neuron_stats(act.long(), ids, 2), TypeError, "act"),
        (lambda: xlkernels.neuron_stats(act[0], ids, 2), ValueError, "act"),
        (lambda: xlkernels.neuron_stats(act.double(), ids, 2), TypeError, "act"),
        (lambda: xlkernels.neuron_stats(act, ids.float(), 2), TypeError, "group_ids"),
        (lambda: xlkernels.neuron_stats(act, ids[:5], 2), ValueError, "group_ids"),
        (lambda: xlkernels.neuron_stats(act, ids.reshape(2, 3), 2), ValueError, "group_ids"),
        (lambda: xlkernels.neuron_stats(act, ids.to("meta"), 2), ValueError, "group_ids"),
        (lambda: xlkernels.neuron_stats(act, ids, 1), ValueError, "group_ids"),
        (lambda: xlkernels.neuron_stats(act, ids - 1, 2), ValueError, "group_ids"),
        (lambda: xlkernels.neuron_stats(act, ids, 0), ValueError, "num_groups"),
        (lambda: xlkernels.neuron_stats(act, ids, 2, stats=NeuronStats.empty(3, 5)), ValueError, "stats"),
        (lambda: xlkernels.neuron_stats(act, ids, 2, stats=NeuronStats.empty(2, 4)), ValueError, "stats"),
        (lambda: xlkernels.neuron_stats(act, ids, 2, stats=NeuronStats.empty(2, 5, layers=2)), ValueError, "stats"),
        (lambda: xlkernels.neuron_stats(act, ids, 2, stats={"sum": 1}), TypeError, "stats"),
        (lambda: xlkernels.neuron_stats(act, ids, 2, stats=NeuronStats.empty(2, 5, device="meta")), ValueError,
         "stats"),
    ]
    for fn, exc, name in cases:
        with pytest.raises(exc, match=name):
            fn()


def test_cpp_op_rejects_bad_ids():
    if "cpu" not in HERE:
        pytest.skip("extension not built")
    s = NeuronStats.empty(2, 5)
    with pytest.raises(RuntimeError, match="group_ids"):
        torch.ops.xlkernels.neuron_stats_accum(torch.randn(3, 5), torch.tensor([0, 2, 1]), s.tokens, s.positive,
                                               s.sum, s.sum_sq, s.max)
    assert int(s.tokens.sum()) == 0  # nothing was written


@pytest.mark.parametrize("op", ["neuron_stats_accum", "neuron_stats_accum_triton"])
def test_opcheck(op):
    if op == "neuron_stats_accum" and "cpu" not in HERE:
        pytest.skip("extension not built")
    if op.endswith("triton") and "triton" not in HERE:
        pytest.skip("triton unavailable")
    s = seeded(3, 11)
    args = (torch.randn(17, 11), make_ids("random", (17,), 3).reshape(-1), s.tokens, s.positive, s.sum, s.sum_sq,
            s.max)
    torch.library.opcheck(getattr(torch.ops.xlkernels, op), args)


@pytest.mark.skipif("triton" not in HERE or torch.cuda.is_available(), reason="runs the Triton interpreter")
@pytest.mark.parametrize("pattern", ["random", "long_runs", "one", "padded_seqs"])
def test_triton_gpu_shapes(pattern, monkeypatch):
    """16x128 tiles and row chunks as on a 4-SM GPU, in the interpreter: several programs add into each
    (group, neuron) with atomics, and runs cross chunk boundaries."""
    monkeypatch.setattr(grids, "GPU", {"sms": 4})
    assert tns.grid_shape(200, 300, *tns.blocks(300), 4) == (3, 5, 48)  # 3 x 5 programs, 48 rows each
    act = torch.randn(200, 300) * 3
    act[60, 3] = float("nan")
    ids = make_ids(pattern, (200,), 5)
    stats = seeded(5, 300)
    want = expected(act, ids, stats)
    assert_stats(run("triton", act, ids, 5, stats), want, backend="triton", act=act, ids=ids)


# ---- GPU (skipped without one) --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nn", [1, 13, 4099])
@pytest.mark.parametrize("pattern", ["random", "runs", "long_runs", "all_skip", "alternate"])
def test_gpu_matches_reference(backend, dtype, nn, pattern):
    n = 2000 if nn > 1000 else 5000
    act = (torch.randn(n, nn) * 3).to(dtype)
    act[7 % n, 0] = float("nan")
    ids = make_ids(pattern, (n,), 6)
    stats = seeded(6, nn)
    want = expected(act, ids, stats)
    got = run(backend, act.cuda(), ids.cuda(), 6, stats.to("cuda"))
    assert_stats(got.to("cpu"), want, rtol=1e-11, backend=backend, act=act, ids=ids)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["neuron_stats_accum", "neuron_stats_accum_triton"])
def test_gpu_opcheck(op):
    s = seeded(3, 300, "cuda")
    args = (torch.randn(257, 300, device="cuda"), make_ids("random", (257,), 3).cuda(), s.tokens, s.positive, s.sum,
            s.sum_sq, s.max)
    torch.library.opcheck(getattr(torch.ops.xlkernels, op), args)


def test_tile_paths_bench_ids():
    """The tile classification (CPU simulation) on bench_neuron_stats' ids: 1 tile in 8 mixes padding with one
    language (the per-element atomic path before 2026-11-30); none holds two languages, so no tile leaves the
    uniform path now."""
    from bench.bench_neuron_stats import make_ids as bench_ids
    ids = bench_ids(16384, 8)
    r = tns.tile_paths(ids, 16, tns.grid_shape(16384, 8192, 16, 128, 132)[2])
    assert r["tiles"] == 1024 and r["mixed_with_padding"] == 128 and r["multi_group"] == 0
    r = tns.tile_paths(torch.tensor([0, 0, -1, 1, -1, 1, 1, 1, 2, -1, 2, 2]), 4)  # [0,0,-1,1] [-1,1,1,1] [2,-1,2,2]
    assert (r["mixed_with_padding"], r["multi_group"], r["flushes"]) == (3, 1, 2)
