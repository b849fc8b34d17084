"""xlkernels.vllm pieces that need vLLM importable but no engine (marker vllm): the steered subclass of every
GPU attention backend's impl (isinstance, MRO, forward signature), a fake impl run through it, the per-layer
activations, request admission, the V1/V2 per-token fills, the config, the TP shard merge."""
import inspect
import types

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("vllm")

from xlkernels.reference import glu as rglu  # noqa: E402
from xlkernels.stats import NeuronStats  # noqa: E402
from xlkernels.vllm import admission, attention, config, install, merge_shards, ops, runners  # noqa: E402
from xlkernels.vllm.state import State  # noqa: E402

pytestmark = pytest.mark.vllm
BACKENDS = [("flash_attn", "FlashAttentionImpl"), ("flashinfer", "FlashInferImpl"),
            ("triton_attn", "TritonAttentionImpl"), ("flex_attention", "FlexAttentionImpl"),
            ("cpu_attn", "CPUAttentionBackendImpl")]
L, H, D, I, R, G = 4, 3, 8, 21, 3, 2


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def _state(g, tokens=64):
    dims = {"num_layers": L, "num_heads": H, "head_dim": D, "num_neurons": I}
    s = State(dims, tokens, R, G, "cpu")
    s.kernels = ops.kernels(torch.device("cpu"))
    s.gate[:, :R] = torch.rand(L, R, H, generator=g) * 2
    s.shift[:, :R] = torch.randn(L, R, H, D, generator=g)
    s.mul[:] = torch.where(torch.rand(L, R, I, generator=g) < 0.3, 0.0, 1.0)
    return s


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("module,name", BACKENDS)
def test_backend_impl_subclass_keeps_its_identity(module, name):
    import importlib
    cls = getattr(importlib.import_module(f"vllm.v1.attention.backends.{module}"), name)
    sub = attention.steered(cls)
    assert attention.steered(cls) is sub and issubclass(sub, cls) and sub is not cls
    assert sub.__mro__ == (sub,) + cls.__mro__
    want = [(p.name, p.kind, p.default) for p in inspect.signature(cls.forward).parameters.values()]
    got = [(p.name, p.kind, p.default) for p in inspect.signature(sub.forward).parameters.values()]
    assert got == want
    impl = object.__new__(cls)
    impl.__class__ = sub
    assert isinstance(impl, cls) and type(impl).__name__ == f"Xlk{name}"


class _FakeImpl:
    """Stands for a backend: writes a deterministic function of the query into output."""
    num_heads, head_size = H, D

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        output.copy_(query * 0.5 - 1.0)
        return output


def _fake_impl_class():
    from vllm.v1.attention.backend import AttentionImpl

    class FakeImpl(_FakeImpl, AttentionImpl):
        def __init__(self):   # AttentionImpl's is abstract
            pass
    return FakeImpl


def test_fake_impl_steers_each_tokens_row(monkeypatch):
    g = _gen()
    s = _state(g)
    monkeypatch.setattr(ops, "STATE", s)
    impl = object.__new__(_fake_impl_class())
    layer = types.SimpleNamespace(impl=impl, layer_name="model.layers.2.self_attn.attn")
    assert attention.refusal(layer, impl) is None
    attention.wrap(layer, 2, H, D)
    t = 37
    rows = torch.randint(-1, R, (t,), generator=g)
    s.fill(rows.numpy(), np.full(t, -1), t + 3)
    q = torch.randn(t + 3, H, D, generator=g)
    out = torch.full_like(q, float("nan"))
    impl.forward(layer, q, q, q, None, None, out)
    base = (q * 0.5 - 1.0).double()
    idx = torch.where(torch.cat([rows, torch.full((3,), -1)]) >= 0, torch.cat([rows, torch.full((3,), -1)]), R)
    want = base * s.gate[2][idx].double()[..., None] + s.shift[2][idx].double()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[t:], (q * 0.5 - 1.0)[t:])          # padding: identity
    with pytest.raises(RuntimeError, match="quantises its output"):
        impl.forward(layer, q, q, q, None, None, out, output_scale=torch.ones(1))


def test_mla_and_signature_refusals():
    from vllm.v1.attention.backend import MLAAttentionImpl

    class FakeMLA(MLAAttentionImpl):
        pass
    FakeMLA.__abstractmethods__ = frozenset()
    impl = object.__new__(FakeMLA)
    assert "MLA" in attention.refusal(types.SimpleNamespace(impl=impl), impl)

    class Odd:
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, scale=None):
            return output
    with pytest.raises(NotImplementedError, match="cannot steer heads through Odd"):
        attention.steered(Odd)


# ---------------------------------------------------------------------------------------------- activations
def test_activations_become_per_layer_hooks(monkeypatch):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul
    g = _gen()
    s = _state(g)
    monkeypatch.setattr(ops, "STATE", s)
    with set_current_vllm_config(VllmConfig()):
        shared, exact = SiluAndMul(), GeluAndMul(approximate="none")

    class Layer(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.act_fn = act

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(shared) for _ in range(L - 1)] + [Layer(exact)])
    assert install.replace_activations(model) == list(range(L - 1))
    acts = [model.layers[i].mlp.act_fn for i in range(L)]
    assert len({id(a) for a in acts[:-1]}) == L - 1 and all(isinstance(a, SiluAndMul) for a in acts[:-1])
    assert [a._xlk_layer for a in acts[:-1]] == list(range(L - 1))
    assert type(acts[-1]) is GeluAndMul                      # exact GELU: no fused kernel, left alone
    assert install.replace_activations(model) == list(range(L - 1))   # idempotent
    t = 19
    rows, groups = torch.randint(-1, R, (t,), generator=g), torch.randint(-1, G, (t,), generator=g)
    s.fill(rows.numpy(), groups.numpy(), t)
    s.stats_reset()
    x = torch.randn(t, 2 * I, generator=g)
    got = acts[1](x)
    want, _ = rglu.glu(x[:, :I].double(), x[:, I:].double(), "silu", rows, s.mul[1].double(), s.add[1].double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert s.stats.tokens[1].tolist() == [int((groups == k).sum()) for k in range(G)]
    assert int(s.stats.tokens[[0, 2, 3]].sum()) == 0
    assert acts[2](x.view(1, t, 2 * I)).shape == (1, t, I)


# ---------------------------------------------------------------------------------------------- admission
def _registry():
    reg = admission.Registry(max_groups=3)
    reg.add("gates", [])
    reg.add("bank", ["de", "fr"])
    reg.add("broken", [], error="ValueError: plan was made for num_heads=5, the model has num_heads=4")
    return reg


@pytest.mark.parametrize("extra,match", [
    ({"xlk_plan": "nope"}, "unknown steering plan 'nope'"),
    ({"xlk_plan": "bank", "xlk_lang": "ja"}, "must be one of"),
    ({"xlk_plan": "bank"}, "must be one of"),
    ({"xlk_plan": "gates", "xlk_lang": "de"}, "no shift bank"),
    ({"xlk_lang": "de"}, "without xlk_plan"),
    ({"xlk_plan": "broken"}, "cannot be served.*num_heads"),
    ({"xlk_plan": 3}, "unknown steering plan"),
    ({"xlk_pln": "gates"}, "unknown xlkernels request keys"),
    ({"xlk_stats": 0}, "collect_stats"),
])
def test_admission_rejects(extra, match):
    with pytest.raises(ValueError, match=match):
        _registry().admit(extra)


def test_admission_salts_and_stats():
    reg = _registry()
    assert reg.admit(None) is None and reg.admit({"other": 1}) is None
    salts = {reg.admit({"xlk_plan": "gates"}), reg.admit({"xlk_plan": "bank", "xlk_lang": "de"}),
             reg.admit({"xlk_plan": "bank", "xlk_lang": "fr"})}
    assert len(salts) == 3 and None not in salts
    before = reg.admit({"xlk_plan": "gates"})
    reg.add("gates", [])                                      # re-registered: new version, new salt
    assert reg.admit({"xlk_plan": "gates"}) != before
    reg.allow_stats = True
    assert reg.admit({"xlk_stats": 2}) is None
    for bad in (3, -1, True, "0"):
        with pytest.raises(ValueError, match="xlk_stats must be"):
            reg.admit({"xlk_stats": bad})


def test_config_parse():
    s = config.parse({"plans": {"de": "/p/de.safetensors"}, "max_plans": 4, "max_groups": 2})
    assert s.to_dict() == {"plans": {"de": "/p/de.safetensors"}, "max_plans": 4, "max_groups": 2}
    assert config.of(types.SimpleNamespace(additional_config={})) is None
    for raw, match in (([], "must be a dict"), ({"plan": {}}, "unknown keys"), ({"plans": ["x"]}, "map plan"),
                       ({"max_plans": -1}, "max_plans"), ({"max_groups": 1.5}, "max_groups")):
        with pytest.raises(ValueError, match=match):
            config.parse(raw)


def test_install_is_inert_without_config():
    runner = types.SimpleNamespace(vllm_config=types.SimpleNamespace(additional_config={"other": 1}))
    assert install.install(runner) is None


# ---------------------------------------------------------------------------------------------- per-step fills
def _requests(g, n_req):
    choices = [{}, {"xlk_plan": "p"}, {"xlk_plan": "b", "xlk_lang": "fr"}, {"xlk_stats": 1},
               {"xlk_plan": "b", "xlk_lang": "de", "xlk_stats": 0}]
    want_of = [(-1, -1), (0, -1), (2, -1), (-1, 1), (1, 0)]
    pick = torch.randint(0, len(choices), (n_req,), generator=g).tolist()
    counts = torch.randint(1, 6, (n_req,), generator=g).numpy()
    return [choices[c] for c in pick], [want_of[c] for c in pick], counts


def _plan_state(tokens=64):
    s = _state(_gen(), tokens)
    s.plans = {"p": {None: 0}, "b": {"de": 1, "fr": 2}}
    return s


def test_v1_fill_maps_tokens_to_requests():
    g = _gen()
    s = _plan_state()
    extras, want, counts = _requests(g, 7)
    qsl = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    req_ids = [f"r{i}" for i in range(7)]
    requests = {r: types.SimpleNamespace(sampling_params=types.SimpleNamespace(extra_args=e))
                for r, e in zip(req_ids, extras)}
    runner = types.SimpleNamespace(input_batch=types.SimpleNamespace(num_reqs=7, req_ids=req_ids),
                                   requests=requests, query_start_loc=types.SimpleNamespace(cpu=torch.from_numpy(qsl)))
    s.rows.fill_(5)
    runners.v1_fill(runner, s, int(qsl[-1]) + 3)
    tok = [w for w, c in zip(want, counts) for _ in range(c)] + [(-1, -1)] * 3
    n = len(tok)
    assert s.rows[:n].tolist() == [t[0] for t in tok] and s.groups[:n].tolist() == [t[1] for t in tok]
    requests["r0"].sampling_params = types.SimpleNamespace(extra_args={"xlk_plan": "gone"})
    with pytest.raises(RuntimeError, match="refusing to run the request unsteered"):
        runners.v1_fill(runner, s, n)


def test_v2_fill_maps_slots_to_tokens():
    g = _gen()
    s = _plan_state()
    extras, want, counts = _requests(g, 6)
    slots = np.full((16, 2), -1, dtype=np.int64)
    where = torch.randperm(16, generator=g)[:6].numpy()
    from xlkernels.vllm.plans import resolve
    for slot, e in zip(where, extras):
        slots[slot] = resolve(s, e)
    n = int(counts.sum())
    batch = types.SimpleNamespace(num_reqs=6, idx_mapping_np=where, num_scheduled_tokens=counts, num_tokens=n,
                                  num_tokens_after_padding=n + 5)
    runners.v2_fill(slots, batch, s)
    tok = [w for w, c in zip(want, counts) for _ in range(c)] + [(-1, -1)] * 5
    assert s.rows[:n + 5].tolist() == [t[0] for t in tok] and s.groups[:n + 5].tolist() == [t[1] for t in tok]
    batch.num_tokens = n - 1                                   # spec-decode style mismatch: refused
    with pytest.raises(RuntimeError, match="were scheduled"):
        runners.v2_fill(slots, batch, s)


# ---------------------------------------------------------------------------------------------- misc
def _rand_stats(L_, K, I_, tokens):
    s = NeuronStats.empty(K, I_, layers=L_)
    s.tokens.copy_(tokens)
    s.positive.random_(0, 50)
    s.sum.normal_()
    s.sum_sq.uniform_()
    s.max.normal_()
    return s


def test_merge_shards_concatenates_neurons():
    full = _rand_stats(3, 2, 10, torch.tensor([[7, 5]] * 3))
    shards = []
    for r, sl in enumerate((slice(0, 5), slice(5, 10))):
        d = {f: getattr(full, f)[..., sl].clone() for f in ("positive", "sum", "sum_sq", "max")}
        shards.append({"tp_rank": r, "tokens": full.tokens.clone(), **d})
    assert merge_shards(shards[::-1]).equal(full)
    shards[1]["tokens"] = shards[1]["tokens"] + 1
    with pytest.raises(RuntimeError, match="TP rank 1 counted"):
        merge_shards(shards)
    with pytest.raises(ValueError, match="one shard per TP rank"):
        merge_shards([shards[0], shards[0]])


@pytest.mark.parametrize("argv,match", [
    (["neurons", "--engine", "vllm", "--tiny", "llama"], "not --tiny"),
    (["neurons", "--engine", "vllm", "--deactivate"], "--deactivate runs on the HF engine"),
    (["steer", "--engine", "vllm", "--tiny", "llama", "--plan", "x", "--prompt", "hi"], "not --tiny"),
    (["steer", "--engine", "vllm", "--plan", "x", "--sigma", "0.5", "--prompt", "hi"], "residual stream"),
])
def test_cli_engine_vllm_refusals(argv, match):
    """Refusals come before any engine starts (the engine runs are in test_vllm.py and the report)."""
    from xlkernels.cli import build_parser
    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError, match=match):
        args._run(args)
