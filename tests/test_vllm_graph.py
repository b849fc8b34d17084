"""The vLLM hook ops are graph-safe by construction (marker vllm; no engine): their bodies compile with
torch.compile(fullgraph=True) under default Dynamo settings (a .item(), nonzero, boolean index or branch on data
would break the graph and fail here), a compiled body replays correctly after its buffers change in place, and
no state tensor ever moves. Fresh random inputs, odd sizes, outputs poisoned, float64 references."""
import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from xlkernels.reference import glu as rglu  # noqa: E402
from xlkernels.reference.neuron_stats import accumulate  # noqa: E402
from xlkernels.stats import FIELDS, NeuronStats  # noqa: E402
from xlkernels.vllm import ops, plans  # noqa: E402
from xlkernels.vllm.state import State  # noqa: E402

pytestmark = pytest.mark.vllm
L, H, D, I, R, G, N = 3, 3, 8, 37, 4, 3, 64


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def _tables(g):
    """Plan tables (last gate/shift row = identity) and neuron tables with fresh random rows."""
    gate = torch.ones(L, R + 1, H)
    shift = torch.zeros(L, R + 1, H, D)
    gate[:, :R] = torch.rand(L, R, H, generator=g) * 2
    gate[:, :R][torch.rand(L, R, H, generator=g) < 0.2] = 0.0
    shift[:, :R] = torch.randn(L, R, H, D, generator=g)
    mul = torch.where(torch.rand(L, R, I, generator=g) < 0.3, 0.0, 1.0)
    add = torch.where(torch.rand(L, R, I, generator=g) < 0.1, torch.randn(L, R, I, generator=g), 0.0)
    return gate, shift, mul, add


def _ids(g, n, hi):
    return torch.randint(-1, hi, (n,), generator=g)


BANNED = {"nonzero", "item", "tolist", "masked_select", "argwhere", "_local_scalar_dense", "unique"}


def _graph_safe(fn, *args):
    """Compile fn with fullgraph=True under default Dynamo settings and check the captured graph: no op with a
    data-dependent output size or a host read of a value (nonzero, item, boolean indexing, ...)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=record)(*args)
    assert len(graphs) == 1
    for node in graphs[0].graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        assert name not in BANNED, f"{name} in the compiled body"
        val = node.meta.get("example_value")
        for v in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(v, torch.Tensor):
                assert not free_unbacked_symbols(v.shape), f"{node.format_node()} has a data-dependent shape"
    torch._dynamo.reset()


def _stats_list(s):
    return [getattr(s, f) for f in FIELDS]


def _ref_mlp(x, layer, act, rows, groups, mul, add, stats):
    """float64: out per token with its plan row's intervention; stats of the pre-intervention activation."""
    t, i = x.shape[0], x.shape[-1] // 2
    gate, up = x[:, :i].double(), x[:, i:].double()
    out, a = rglu.glu(gate, up, act, rows[:t], mul[layer].double(), add[layer].double())
    accumulate(a, groups[:t], *(getattr(stats, f)[layer] for f in FIELDS))
    return out


def _check_stats(got, want, tol=1e-5):
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.positive, want.positive)
    for f in ("sum", "sum_sq"):
        torch.testing.assert_close(getattr(got, f), getattr(want, f), rtol=tol, atol=tol)
    torch.testing.assert_close(got.max.double(), want.max.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_mlp_body_fullgraph_and_replay(act):
    g = _gen()
    k = ops.kernels(torch.device("cpu"))
    gate, shift, mul, add = _tables(g)
    rows = torch.full((N,), -1, dtype=torch.int64)
    groups = torch.full((N,), -1, dtype=torch.int64)
    stats = NeuronStats.empty(G, I, layers=L)
    layer = 1

    def body(x, rows, groups, mul, add, *st):
        return ops.mlp(x, layer, act, rows, groups, mul, add, list(st), k["fwd"], k["fwd_stats"])

    x = torch.randn(29, 2 * I, generator=g)
    _graph_safe(body, x, rows, groups, mul, add, *_stats_list(NeuronStats.empty(G, I, layers=L)))
    compiled = torch.compile(body, fullgraph=True)
    # identity buffers: the plain GLU, nothing counted
    got = compiled(x, rows, groups, mul, add, *_stats_list(stats))
    torch.testing.assert_close(got.double(), rglu.glu(x[:, :I].double(), x[:, I:].double(), act)[0])
    assert int(stats.tokens.sum()) == 0
    # the same compiled body after the buffers change in place, twice, at another batch size
    ref_stats = NeuronStats.empty(G, I, layers=L)
    for t in (23, 41):
        rows[:] = _ids(g, N, R)
        groups[:] = _ids(g, N, G)
        mul[:] = torch.where(torch.rand(L, R, I, generator=g) < 0.3, 0.0, 1.0)
        x = torch.randn(t, 2 * I, generator=g)
        got = compiled(x, rows, groups, mul, add, *_stats_list(stats))
        want = _ref_mlp(x, layer, act, rows, groups, mul, add, ref_stats)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        eager = body(x, rows, groups, mul, add, *_stats_list(NeuronStats.empty(G, I, layers=L)))
        assert torch.equal(got, eager)
    _check_stats(stats, ref_stats)
    assert int(stats.tokens.sum()) == int((groups[:23] >= 0).sum() + (groups[:41] >= 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_heads_body_fullgraph_and_replay(dtype):
    g = _gen()
    k = ops.kernels(torch.device("cpu"))
    gate, shift, _, _ = _tables(g)
    rows = torch.full((N,), -1, dtype=torch.int64)
    layer = 2

    def body(out, rows, gate, shift):
        ops.heads(out, layer, rows, gate, shift, k["steer"])
        return out

    o = torch.randn(19, H, D, generator=g).to(dtype)
    _graph_safe(body, o.clone(), rows, gate, shift)
    compiled = torch.compile(body, fullgraph=True)
    assert torch.equal(compiled(o.clone(), rows, gate, shift), o)   # identity rows: untouched
    for t in (19, 33):
        rows[:] = _ids(g, N, R)
        gate[:, :R] = torch.rand(L, R, H, generator=g)
        o = torch.randn(t, H, D, generator=g).to(dtype)
        got = compiled(o.clone(), rows, gate, shift)
        r = rows[:t]
        idx = torch.where(r >= 0, r, R)
        want = o.double() * gate[layer][idx].double()[..., None] + shift[layer][idx].double()
        tol = 1e-6 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        assert torch.equal(got[r < 0], o[r < 0])
        assert torch.equal(got, body(o.clone(), rows, gate, shift))


def _plan(g, langs=None):
    from xlkernels.analysis.steering.plan import SteeringPlan
    gate = torch.ones(L, 2 * H)
    gate[1, 2] = 0.0
    shift = torch.randn(len(langs), L, 2 * H, D, generator=g) if langs else None
    neurons = {0: torch.randperm(2 * I, generator=g)[:5].sort().values}
    return SteeringPlan(gate=gate, shift=shift, languages=list(langs or []), neurons=neurons)


def test_state_tensors_never_move():
    """data_ptr of every state tensor: fixed across plan registration, statistics begin/end, growing batches."""
    g = _gen()
    dims = {"num_layers": L, "num_heads": 2 * H, "head_dim": D, "num_neurons": 2 * I}
    s = State(dims, N, R, G, "cpu", rank=1, world=2)
    s.heads_refusal, s.plans, s.plan_errors = None, {}, {}
    ptrs = {k: t.data_ptr() for k, t in s.tensors().items()}
    assert set(ptrs) == {"rows", "groups", "gate", "shift", "mul", "add"} | {f"stats.{f}" for f in FIELDS}
    assert plans.register(s, "bank", _plan(g, ["de", "fr"])) == ["de", "fr"]
    plans.register(s, "gates", _plan(g))
    plans.register(s, "bank", _plan(g, ["de", "fr", "es"]))   # replaced: rows freed and taken again
    with pytest.raises(ValueError, match="max_plans"):
        plans.register(s, "big", _plan(g, ["a", "b"]))
    s.stats_reset()
    for n in (1, 7, 30, N):
        s.fill(np.random.randint(-1, R, n), np.random.randint(-1, G, n), n)
        s.stats.tokens.add_(1)
    taken = s.stats_take(2)
    assert taken.tokens.shape == (L, 2) and int(s.stats.tokens.sum()) == 0
    plans.unregister(s, "gates")
    s.identity()
    assert {k: t.data_ptr() for k, t in s.tensors().items()} == ptrs
    with pytest.raises(RuntimeError, match="does not fit"):
        s.fill(np.zeros(N + 1, dtype=np.int64), np.zeros(N + 1, dtype=np.int64), N + 1)


def test_plan_rows_hold_this_ranks_slice():
    g = _gen()
    dims = {"num_layers": L, "num_heads": 2 * H, "head_dim": D, "num_neurons": 2 * I}
    plan = _plan(g, ["de", "fr"])
    plan.alpha = 1.5
    for rank in (0, 1):
        s = State(dims, N, R, 0, "cpu", rank=rank, world=2)
        s.heads_refusal, s.plans, s.plan_errors = None, {}, {}
        plans.register(s, "bank", plan)
        h, i = slice(H * rank, H * rank + H), slice(I * rank, I * rank + I)
        for k, lang in enumerate(["de", "fr"]):
            r = s.plans["bank"][lang]
            assert torch.equal(s.gate[:, r], plan.gate[:, h])
            assert torch.equal(s.shift[:, r], 1.5 * plan.shift[k][:, h])
            want = torch.ones(L, 2 * I)
            want[0, plan.neurons[0]] = 0.0
            assert torch.equal(s.mul[:, r], want[:, i])
        assert torch.equal(s.gate[:, R], torch.ones(L, H)) and not s.shift[:, R].any()   # identity row
