"""xlkernels.vllm pieces that need vLLM importable but no engine (marker vllm): the V2-runner refusal, the TP
shard merge, the per-rank plan rows, the inert plugin, the per-step token map."""
import types

import pytest
import torch

pytest.importorskip("vllm")

from xlkernels.stats import NeuronStats  # noqa: E402
from xlkernels.vllm import _hooks, check_runner, merge_shards, plugin  # noqa: E402
from xlkernels.vllm.worker import plan_rows  # noqa: E402

pytestmark = pytest.mark.vllm


def test_v2_runner_refused():
    check_runner(types.SimpleNamespace(use_v2_model_runner=False))
    with pytest.raises(RuntimeError, match="V2 runner.*VLLM_USE_V2_MODEL_RUNNER=0"):
        check_runner(types.SimpleNamespace(use_v2_model_runner=True))


def _rand_stats(L, K, I, tokens):
    s = NeuronStats.empty(K, I, layers=L)
    s.tokens.copy_(tokens)
    s.positive.random_(0, 50)
    s.sum.normal_()
    s.sum_sq.uniform_()
    s.max.normal_()
    return s


def test_merge_shards_concatenates_neurons():
    L, K, I = 3, 2, 10
    full = _rand_stats(L, K, I, torch.tensor([[7, 5]] * L))
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


def test_plan_rows_slice_heads_and_neurons():
    from xlkernels.analysis.steering.plan import SteeringPlan
    L, H, D, I = 3, 4, 2, 8
    dims = {"num_layers": L, "num_heads": H, "head_dim": D, "num_neurons": I}
    gate = torch.rand(L, H)
    bank = torch.randn(2, L, H, D)
    plan = SteeringPlan(gate=gate, shift=bank, languages=["de", "fr"], alpha=2.0,
                        neurons={1: torch.tensor([0, 5, 6])})
    for rank in (0, 1):
        rows = plan_rows(plan, 2.0, dims, rank, 2)
        assert [r[0] for r in rows] == ["de", "fr"]
        h = slice(2 * rank, 2 * rank + 2)
        for k, (_, g, s, m) in enumerate(rows):
            assert torch.equal(g, gate[:, h])
            assert torch.equal(s, 2.0 * bank[k][:, h])
            want = torch.ones(I)
            want[[0, 5, 6]] = 0
            assert torch.equal(m[1], want[4 * rank:4 * rank + 4]) and set(m) == {1}


def test_plugin_inert_without_env(monkeypatch):
    called = []
    monkeypatch.delenv(plugin.ENV, raising=False)
    monkeypatch.setattr(_hooks, "install", lambda: called.append(1))
    plugin.register()
    assert not called
    monkeypatch.setenv(plugin.ENV, "1")
    plugin.register()
    assert called == [1]


def test_begin_step_maps_tokens_to_requests(monkeypatch):
    """Fresh random batches: the per-token plan rows / stats groups equal a per-token Python reference."""
    S = _hooks.STATE
    monkeypatch.setattr(S, "plans", {"p": {None: 0}, "b": {"de": 1, "fr": 2}})
    monkeypatch.setattr(S, "stats", NeuronStats.empty(3, 4, layers=2))
    monkeypatch.setattr(S, "req_cache", {})
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    choices = [{}, {"xlk_plan": "p"}, {"xlk_plan": "b", "xlk_lang": "fr"}, {"xlk_stats": 2},
               {"xlk_plan": "b", "xlk_lang": "de", "xlk_stats": 0}, {"xlk_plan": "missing"}]
    want_of = [(-1, -1), (0, -1), (2, -1), (-1, 2), (1, 0), (-1, -1)]
    n_req = 7
    pick = torch.randint(0, len(choices), (n_req,), generator=g).tolist()
    counts = torch.randint(1, 6, (n_req,), generator=g)
    qsl = torch.zeros(n_req + 1, dtype=torch.int32)
    qsl[1:] = counts.cumsum(0)
    req_ids = [f"r{i}" for i in range(n_req)]
    requests = {r: types.SimpleNamespace(sampling_params=types.SimpleNamespace(extra_args=choices[c]))
                for r, c in zip(req_ids, pick)}
    runner = types.SimpleNamespace(input_batch=types.SimpleNamespace(num_reqs=n_req, req_ids=req_ids),
                                   requests=requests, query_start_loc=types.SimpleNamespace(cpu=qsl))
    pad = int(qsl[-1]) + 3
    _hooks.begin_step(runner, pad)
    try:
        want_rows = [want_of[c][0] for c, n in zip(pick, counts.tolist()) for _ in range(n)] + [-1] * 3
        want_groups = [want_of[c][1] for c, n in zip(pick, counts.tolist()) for _ in range(n)] + [-1] * 3
        if all(w == (-1, -1) for w in (want_of[c] for c in pick)):
            assert not S.active
            return
        assert S.active and S.n == int(qsl[-1])
        assert S.rows[:pad].tolist() == want_rows
        assert S.groups[:pad].tolist() == want_groups
        steered = [i for i, r in enumerate(want_rows) if r >= 0]
        assert (S.sel.tolist() if S.sel is not None else []) == steered
    finally:
        _hooks.end_step()


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
