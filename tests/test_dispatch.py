"""The CUDA dispatch rule table of steered_attention (xlkernels/dispatch.py) and how backends.select uses it.
No GPU needed: rules are evaluated on synthetic Facts (fake device capabilities), and backends.select is asked
about a CUDA device with availability patched."""
import json

import pytest
import torch

import xlkernels
from xlkernels import backends, dispatch
from xlkernels.dispatch import Facts, Rule

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _default_rules():
    dispatch.set_rules(None)
    backends._unforced.clear()  # the tests patch why_not
    yield
    dispatch.set_rules(None)
    backends._unforced.clear()


@pytest.fixture
def both_available(monkeypatch):
    """Pretend the 'cuda' and 'triton' backends can run steered_attention on CUDA."""
    real = backends.why_not
    monkeypatch.setattr(backends, "why_not", lambda op, name, device: None if device.type == "cuda" and
                        name in ("cuda", "triton") else real(op, name, device))
    monkeypatch.delenv("XLKERNELS_BACKEND", raising=False)


PREFILL = dict(capability=(9, 0), head_dim=128, T=4096, S=4096, dtype="bfloat16")


@pytest.mark.parametrize("facts, want", [
    (dict(), "cuda"),                                    # plain prefill: SDPA + epilogue
    (dict(T=1), "cuda"),                                 # plain decode
    (dict(capability=(8, 0), dtype="float16"), "cuda"),
    (dict(softcap=True), "triton"),                      # SDPA has no softcap
    (dict(gate_grad=True), "triton"),                    # d gate from the fused backward
    (dict(masked_heads=True), "triton"),                 # only the fused kernel skips masked heads
    (dict(T=1, masked_heads=True), "triton"),
    (dict(dtype="float64", softcap=True), "cuda"),       # no float64 Triton kernels, whatever else
], ids=["prefill", "decode", "sm80-fp16", "softcap", "gate_grad", "masked", "masked-decode", "float64"])
def test_default_rules(facts, want):
    assert dispatch.choose(Facts(**{**PREFILL, **facts})) == want


def test_choice_is_among_available_backends():
    assert dispatch.choose(Facts(**PREFILL), available=("triton",)) == "triton"
    assert dispatch.choose(Facts(**PREFILL, softcap=True), available=("cuda",)) == "cuda"


def test_rule_conditions_and_ranges():
    rules = (Rule("triton", "decode on sm_90+", capability=((9, 0), None), T=(None, dispatch.DECODE_T)),
             Rule("triton", "long keys, small heads", head_dim=(None, 64), S=(8192, None), dtypes=("bfloat16",)),
             Rule("cuda"))
    pick = lambda **kw: dispatch.choose(Facts(**{**PREFILL, **kw}), rules=rules)  # noqa: E731
    assert pick(T=1) == "triton" and pick(T=16) == "triton" and pick(T=17) == "cuda"
    assert pick(T=1, capability=(8, 9)) == "cuda" and pick(T=1, capability=(10, 0)) == "triton"
    assert pick(head_dim=64, S=8192) == "triton" and pick(head_dim=64, S=8191) == "cuda"
    assert pick(head_dim=128, S=8192) == "cuda" and pick(head_dim=64, S=8192, dtype="float16") == "cuda"


def test_select_consults_the_table_on_cuda(both_available):
    for kw, want in ((dict(), "cuda"), (dict(softcap=True), "triton"), (dict(gate_grad=True), "triton"),
                     (dict(masked_heads=True), "triton")):
        assert backends.select("steered_attention", CUDA, Facts(**{**PREFILL, **kw})) == want
    # without facts, or on CPU, nothing changes
    assert backends.select("steered_attention", CUDA) == "cuda"
    assert backends.select("steered_attention", "cpu", Facts(**PREFILL, softcap=True)) == "cpu"


def test_select_falls_back_when_the_rule_backend_is_missing(monkeypatch):
    monkeypatch.setattr(backends, "why_not", lambda op, name, device: None if name == "cuda" else "missing")
    monkeypatch.delenv("XLKERNELS_BACKEND", raising=False)
    assert backends.select("steered_attention", CUDA, Facts(**PREFILL, softcap=True)) == "cuda"


def test_forced_backend_wins(both_available, monkeypatch):
    facts = Facts(**PREFILL, softcap=True)
    with xlkernels.backend("cuda"):
        assert backends.select("steered_attention", CUDA, facts) == "cuda"
    with xlkernels.backend({"steered_attention": "cuda"}):
        assert backends.select("steered_attention", CUDA, facts) == "cuda"
    monkeypatch.setenv("XLKERNELS_BACKEND", "cuda")
    assert backends.select("steered_attention", CUDA, facts) == "cuda"
    with xlkernels.backend("triton"):
        assert backends.select("steered_attention", CUDA, Facts(**PREFILL)) == "triton"


def test_set_rules_replaces_the_table(both_available):
    old = dispatch.set_rules([Rule("triton", "always fused")])
    assert old == dispatch.DEFAULT_RULES
    assert backends.select("steered_attention", CUDA, Facts(**PREFILL)) == "triton"
    # JSON form: lists become tuples, first match wins
    text = json.dumps([{"backend": "cuda", "capability": [[9, 0], None], "T": [None, 16]},
                       {"backend": "triton", "why": "the rest"}])
    dispatch.set_rules(json.loads(text))
    assert dispatch.RULES[0].capability == ((9, 0), None)
    assert backends.select("steered_attention", CUDA, Facts(**{**PREFILL, "T": 1})) == "cuda"
    assert backends.select("steered_attention", CUDA, Facts(**{**PREFILL, "T": 1, "capability": (8, 0)})) == "triton"
    dispatch.set_rules(None)
    assert dispatch.RULES == dispatch.DEFAULT_RULES


def test_set_rules_rejects_bad_rules():
    with pytest.raises(ValueError, match="unknown rule keys"):
        dispatch.set_rules([{"backend": "cuda", "seq_len": 3}])
    with pytest.raises(ValueError, match="'cuda' or 'triton'"):
        dispatch.set_rules([{"backend": "cpu"}])
    with pytest.raises(TypeError, match="backend"):
        dispatch.set_rules([{"why": "no backend"}])
    assert dispatch.RULES == dispatch.DEFAULT_RULES


def test_rules_trace_under_compile():
    """The decision is plain Python on shapes: torch.compile traces it without a graph break, also with
    dynamic shapes (guards on the comparisons), and re-decides when the shape crosses a rule's bound."""
    dispatch.set_rules([Rule("triton", T=(None, dispatch.DECODE_T)), Rule("cuda")])

    def f(q):
        pick = dispatch.choose(Facts(capability=(9, 0), head_dim=q.shape[-1], T=q.shape[-2], S=q.shape[-2],
                                     dtype=dispatch.dtype_name(q.dtype), gate_grad=q.requires_grad))
        return q * (2.0 if pick == "triton" else 3.0)

    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True, dynamic=True, backend="eager")
    for T, scale in ((4, 2.0), (16, 2.0), (17, 3.0), (64, 3.0)):
        q = torch.ones(1, 2, T, 8)
        assert torch.equal(g(q), q * scale)
    torch._dynamo.reset()


def test_info_prints_the_table():
    from xlkernels.commands import info
    text = info.report("cpu")
    assert "rule table" in text and "default" in text
    for rule in dispatch.DEFAULT_RULES:
        assert dispatch.describe(rule) in text
    assert "prefill, 50% heads masked      triton" in text
    dispatch.set_rules([Rule("triton", "always fused")])
    text = info.report("cpu")
    assert "replaced by set_rules" in text and "prefill T=S=4096 D=128 bf16    triton" in text
    with xlkernels.backend("cuda"):
        assert "forced: cuda" in info.report("cpu")
