"""NeuronStats container (derived stats, merge, stack/layer, safetensors io, all_reduce) and NeuronIntervention."""
import pytest
import torch

from xlkernels import NeuronIntervention, NeuronStats
from xlkernels.reference import neuron_stats as rn


def random_stats(groups=3, nn=7, n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    act = torch.randn(n, nn, generator=g)
    ids = torch.randint(-1, groups, (n,), generator=g)
    return NeuronStats(**rn.neuron_stats(act, ids, groups)), act, ids


def test_empty_shapes_and_dtypes():
    s = NeuronStats.empty(3, 5)
    assert s.tokens.shape == (3,) and s.sum.shape == (3, 5) and s.num_groups == 3 and s.num_neurons == 5
    assert (s.tokens.dtype, s.positive.dtype, s.sum.dtype, s.sum_sq.dtype, s.max.dtype) == (
        torch.int64, torch.int64, torch.float64, torch.float64, torch.float32)
    assert torch.equal(s.max, torch.full((3, 5), float("-inf")))
    s = NeuronStats.empty(3, 5, layers=4)
    assert s.tokens.shape == (4, 3) and s.max.shape == (4, 3, 5)
    with pytest.raises(ValueError, match="num_groups"):
        NeuronStats.empty(0, 5)
    with pytest.raises(ValueError, match="num_neurons"):
        NeuronStats.empty(2, 0)


def test_derived_quantities():
    s, act, ids = random_stats()
    for grp in range(3):
        x = act[ids == grp].double()
        assert torch.allclose(s.probability()[grp], (x > 0).double().mean(0))
        assert torch.allclose(s.mean()[grp], x.mean(0))
        assert torch.allclose(s.var()[grp], x.var(0, unbiased=False))
    empty = NeuronStats.empty(2, 3)
    assert empty.probability().isnan().all() and empty.mean().isnan().all() and empty.var().isnan().all()


def test_methods_broadcast_over_layers():
    parts = [random_stats(seed=k)[0] for k in range(3)]
    st = NeuronStats.stack(parts)
    assert st.sum.shape == (3, 3, 7) and st.tokens.shape == (3, 3)
    for k in range(3):
        assert torch.equal(st.probability()[k], parts[k].probability())
        assert torch.allclose(st.var()[k], parts[k].var())
        assert st.layer(k).equal(parts[k])
    view = st.layer(1)
    view.tokens.add_(5)  # layer() gives views: accumulation lands in the stacked stats
    assert torch.equal(st.tokens[1], parts[1].tokens + 5)
    merged = st.clone().merge(st)
    assert torch.equal(merged.tokens, 2 * st.tokens) and torch.equal(merged.max, st.max)
    with pytest.raises(ValueError, match="leading"):
        parts[0].layer(0)
    with pytest.raises(ValueError, match="stats_list"):
        NeuronStats.stack([parts[0], NeuronStats.empty(3, 8)])


def test_merge_equals_concatenation_and_max_nan():
    a, act_a, ids_a = random_stats(seed=1)
    b, act_b, ids_b = random_stats(seed=2)
    both = NeuronStats(**rn.neuron_stats(torch.cat([act_a, act_b]), torch.cat([ids_a, ids_b]), 3))
    m = a.clone().merge(b)
    assert torch.equal(m.tokens, both.tokens) and torch.equal(m.positive, both.positive)
    assert torch.equal(m.max, both.max)
    assert torch.allclose(m.sum, both.sum, rtol=1e-13) and torch.allclose(m.sum_sq, both.sum_sq, rtol=1e-13)
    b.max[0, 0] = float("nan")
    assert a.clone().merge(b).max[0, 0].isnan()
    with pytest.raises(ValueError, match="other"):
        a.merge(NeuronStats.empty(3, 8))
    with pytest.raises(TypeError, match="other"):
        a.merge({})


def test_validation_names_field():
    s = NeuronStats.empty(2, 3)
    with pytest.raises(TypeError, match="sum"):
        NeuronStats(s.tokens, s.positive, s.sum.float(), s.sum_sq, s.max)
    with pytest.raises(ValueError, match="positive"):
        NeuronStats(s.tokens, s.positive[:, :2], s.sum, s.sum_sq, s.max)
    with pytest.raises(ValueError, match="tokens"):
        NeuronStats(s.tokens[:1], s.positive, s.sum, s.sum_sq, s.max)


def test_save_load_roundtrip_and_validation(tmp_path):
    from safetensors.torch import save_file
    s = NeuronStats.stack([random_stats(seed=k)[0] for k in range(2)])
    p = tmp_path / "s.safetensors"
    s.save(p)
    back = NeuronStats.load(p)
    assert back.equal(s)
    with open(p, "rb") as f:
        assert b"pickle" not in f.read(200)
    bad = {f: getattr(s, f).contiguous() for f in ("tokens", "positive", "sum", "sum_sq", "max")}
    bad["sum"] = bad["sum"].float()
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata={"format": "xlkernels.NeuronStats"})
    with pytest.raises(ValueError, match="bad.safetensors: malformed NeuronStats .*sum"):   # FileError
        NeuronStats.load(tmp_path / "bad.safetensors")
    bad["sum"] = s.sum[..., :3].contiguous()
    save_file(bad, str(tmp_path / "bad2.safetensors"), metadata={"format": "xlkernels.NeuronStats"})
    with pytest.raises(ValueError, match="sum"):
        NeuronStats.load(tmp_path / "bad2.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a NeuronStats"):
        NeuronStats.load(tmp_path / "other.safetensors")


def _neg_nan():
    """NaN as x86 arithmetic makes it: sign bit set (0xffc00000), unlike float("nan")."""
    x = torch.tensor([float("inf")]) - float("inf")
    assert x.view(torch.int32).item() < 0
    return x


def _is_canonical_nan(t):
    return bool(torch.isnan(t).all()) and bool((t.view(torch.int32) == 0x7FC00000).all())


BACKENDS = ["cpu", "triton", "reference"]


@pytest.mark.parametrize("first", BACKENDS)
@pytest.mark.parametrize("then", BACKENDS)
@pytest.mark.parametrize("op", ["neuron_stats", "glu"])
def test_max_nan_survives_mixed_backends(first, then, op):
    """A NaN accumulated on one backend stays NaN when another backend adds larger values (issue: cpu's negative
    NaN, then 2.0 on triton, gave max 2.0 while sum was NaN)."""
    import xlkernels
    n, I = 5, 9
    ids = torch.zeros(n, dtype=torch.long)

    def run(backend, act):
        with xlkernels.backend(backend):
            if op == "neuron_stats":
                xlkernels.neuron_stats(act, ids, 1, stats=st)
            else:  # silu(g) * u with u = 1: the activation is silu(g); inf - inf in g gives a NaN activation
                xlkernels.glu(act, torch.ones_like(act), "silu", stats=st, group_ids=ids)
    st = NeuronStats.empty(1, I)
    act = torch.randn(n, I)
    act[2, 4] = _neg_nan()
    run(first, act)
    assert _is_canonical_nan(st.max[0, 4]) and st.sum[0, 4].isnan()
    run(then, torch.full((n, I), 2.0) + torch.rand(n, I))
    assert _is_canonical_nan(st.max[0, 4]), st.max[0, 4]
    assert st.sum[0, 4].isnan() and not st.max[0, :4].isnan().any()


def test_merge_and_load_canonicalise_nan(tmp_path):
    from safetensors.torch import save_file
    a = NeuronStats.empty(1, 3)
    a.max.copy_(torch.tensor([[1.0, 1.0, 1.0]]))
    b = NeuronStats.empty(1, 3)
    b.max[0, 1] = _neg_nan()[0]
    m = a.clone().merge(b)
    assert _is_canonical_nan(m.max[0, 1]) and m.max[0, 0] == 1.0
    m = b.clone().merge(a)
    assert _is_canonical_nan(m.max[0, 1]) and m.max[0, 0] == 1.0
    save_file({f: getattr(b, f) for f in ("tokens", "positive", "sum", "sum_sq", "max")},
              str(tmp_path / "s.safetensors"), metadata={"format": "xlkernels.NeuronStats"})
    assert _is_canonical_nan(NeuronStats.load(tmp_path / "s.safetensors").max[0, 1])


def _worker(rank, path, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    s = random_stats(seed=10 + rank)[0]
    if rank == 1:
        s.max[1, 2] = _neg_nan()[0]  # NaN on one rank only, a larger number on the other
        s.max[0, 0] = float("nan")
    else:
        s.max[1, 2] = 1e30
    s.all_reduce()
    if rank == 0:
        s.save(out)
    dist.destroy_process_group()


def test_all_reduce_two_ranks(tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "red.safetensors"
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    got = NeuronStats.load(out)
    want = random_stats(seed=10)[0].merge(random_stats(seed=11)[0])
    want.max[1, 2] = want.max[0, 0] = float("nan")
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.positive, want.positive)
    assert torch.allclose(got.max, want.max, rtol=0, atol=0, equal_nan=True)
    assert _is_canonical_nan(got.max[1, 2]) and torch.allclose(got.sum, want.sum, rtol=1e-13)


# ---- NeuronIntervention -----------------------------------------------------------------------------------------
def test_intervention_builders():
    z = NeuronIntervention.zero([1, 3], 5)
    assert z.mul.tolist() == [1, 0, 1, 0, 1] and z.add.tolist() == [0] * 5 and z.num_groups is None
    s = NeuronIntervention.set(torch.tensor([0, 4]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 5)
    assert s.mul.shape == (2, 5) and s.num_groups == 2
    assert s.add[1].tolist() == [3, 0, 0, 0, 4] and s.mul[0].tolist() == [0, 1, 1, 1, 0]
    sc = NeuronIntervention.scale([2], 0.5, 5)
    x = torch.randn(4, 5)
    y = sc.apply(x)
    assert torch.equal(y[:, 2], x[:, 2] * 0.5) and torch.equal(y[:, 0], x[:, 0])
    both = z.then(sc)
    assert torch.equal(both.apply(x), sc.apply(z.apply(x)))
    ids = torch.tensor([0, 1, -1, 1])
    y = s.apply(x, ids)
    assert torch.equal(y[2], x[2])  # -1 rows untouched by a per-group intervention
    assert y[1, 0] == 3 and y[3, 4] == 4 and y[0, 4] == 2
    mask = torch.zeros(5, dtype=torch.bool)
    mask[[0, 2]] = True
    assert NeuronIntervention.zero(mask, 5).mul.tolist() == [0, 1, 0, 1, 1]


def test_intervention_errors():
    with pytest.raises(ValueError, match="indices"):
        NeuronIntervention.zero([5], 5)
    with pytest.raises(ValueError, match="indices"):
        NeuronIntervention.zero([-1], 5)
    with pytest.raises(TypeError, match="indices"):
        NeuronIntervention.zero([0.5], 5)
    with pytest.raises(ValueError, match="values"):
        NeuronIntervention.set([0, 1], [1.0, 2.0, 3.0], 5)
    with pytest.raises(ValueError, match="factor"):
        NeuronIntervention.scale([0, 1], [1.0, 2.0, 3.0], 5)
    with pytest.raises(ValueError, match="num_neurons"):
        NeuronIntervention.zero([0], 0)
    with pytest.raises(ValueError, match="mul"):
        NeuronIntervention(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="add"):
        NeuronIntervention(torch.ones(4), torch.zeros(5))
    with pytest.raises(ValueError, match="group_ids"):
        NeuronIntervention.set([0], [[1.0]], 5).apply(torch.randn(2, 5))

