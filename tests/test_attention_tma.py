"""The Hopper forward (TMA descriptors, warp-specialised config) against float64, forced on here (XLKERNELS_TMA=1
semantics) so the interpreter runs it; the layout checks that send other inputs to the pointer kernel; and the
static record's proof that it compiles to TMA loads, wgmma and a warp-specialised loop on sm_90a."""
import json
import os

import pytest
import torch

from test_steered_attention import GPU_CASES, GRID, TDEV, _id, check_case
from xlkernels.triton import attention_tma as tma
from xlkernels.triton import grids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(tma.TensorDescriptor is None, reason="this triton has no tensor descriptors")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(grids, "POISON", True)


@pytest.fixture
def forced(monkeypatch):
    """MODE "1", and a count of the TMA launches (each test must take that path)."""
    monkeypatch.setattr(tma, "MODE", "1")
    ran = []
    real = tma.forward

    def spy(*a, **kw):
        ran.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(tma, "forward", spy)
    return ran


PREFILL = [c for c in GRID if c[3] > 16]  # T <= 16 decodes with the split-KV kernel


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", PREFILL, ids=[_id(c) for c in PREFILL])
def test_tma_forward_matches_reference(case, dtype, forced):
    B, H, Hkv, T, S, D, kw = case
    if dtype == torch.bfloat16 and tma.ac.INTERP and T > S:
        pytest.skip("interpreter: its truncating bf16 store exceeds 2x here, in the pointer kernel alike")
    check_case(B, H, Hkv, T, S, D, dtype, **dict(kw))
    assert forced, "the TMA kernel did not run"


TMA_PARAMS = [(c, i) for c in GPU_CASES for i in range(len(tma.TMA_CONFIGS[tma.ac._dbucket(c[5])]))]


@pytest.mark.parametrize("case,config", TMA_PARAMS, ids=[f"{_id(c)}-config{i}" for c, i in TMA_PARAMS])
def test_tma_gpu_tile_configs(case, config, monkeypatch, forced):
    """Each shipped config (the warp-specialised one runs a single loop that masks every block)."""
    monkeypatch.setattr(grids, "GPU", {"config": config, "sms": 132})
    B, H, Hkv, T, S, D, kw = case
    check_case(B, H, Hkv, T, S, D, torch.float16, **dict(kw))
    assert forced


@pytest.mark.parametrize("config", [0, 2])
def test_tma_folded_grid_spare_programs(config, monkeypatch, forced):
    """10 (batch, head) pairs on 12 programs: the spare ones must neither loop nor store (no early return)."""
    monkeypatch.setattr(grids, "AXIS_MAX", 4)
    monkeypatch.setattr(grids, "GPU", {"config": config, "sms": 132})
    check_case(5, 2, 1, 40, 40, 64, torch.float16, kpm="some", shift="bhd", causal=True)
    assert forced


def test_layouts_tma_cannot_describe_take_the_pointer_kernel(forced):
    q = torch.randn(1, 2, 40, 72, dtype=torch.float16, device=TDEV)
    k, v = torch.randn_like(q), torch.randn_like(q)
    assert tma.usable(q, k, v)
    assert not tma.usable(q.float(), k.float(), v.float())  # fp32
    odd = torch.randn(1, 2, 40, 73, dtype=torch.float16, device=TDEV)[..., :72]  # row stride 146 B
    assert not tma.usable(odd, k, v)
    assert not tma.usable(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v)  # last dim not contiguous
    shifted = torch.randn(2 * 40 * 72 + 1, dtype=torch.float16, device=TDEV)[1:].view(1, 2, 40, 72)
    assert not tma.usable(shifted, k, v)  # base not 16-byte aligned
    assert not tma.usable(q, k[:, :1].expand(1, 2, 40, 72), v)  # a stride of 0
    tiny = torch.randn(1, 2, 40, 4, dtype=torch.float16, device=TDEV)
    assert not tma.usable(tiny, tiny, tiny)  # 8-byte rows
    # the fallback still gives the right answer (pointer kernel)
    check_case(1, 2, 2, 40, 40, 72, torch.float32, causal=True)
    assert not forced


def test_mode_auto_and_off(monkeypatch):
    q = torch.randn(1, 2, 40, 64, dtype=torch.float16)
    monkeypatch.setattr(tma, "MODE", "auto")
    assert not tma.usable(q, q, q)  # a CPU tensor
    monkeypatch.setattr(tma, "MODE", "0")
    assert not tma.usable(q, q, q)


def test_static_record_shows_tma_and_warp_specialisation():
    with open(os.path.join(ROOT, "bench", "results", "static", "sm90a.json")) as f:
        rows = [r for r in json.load(f)["rows"] if r["kernel"] == "attention_tma._fwd_tma_kernel"]
    from bench.static_report import DTYPES, HEAD_DIMS, VARIANTS
    from xlkernels.triton.attention_common import _dbucket
    per = sum(len(tma.TMA_CONFIGS[_dbucket(max(16, 1 << (d - 1).bit_length()))]) for d in HEAD_DIMS)
    assert len(rows) == per * len(DTYPES) * len(VARIANTS)
    assert all(r["async_loads"] == "tma" and r["mma"] == "wgmma" and r["loop_spill_stores"] == 0 for r in rows)
    ws = [r for r in rows if r["blocks"].get("WS")]
    assert ws and all(r["warp_spec"] and r["threads"] == 384 for r in ws)
    assert {r["D"] for r in ws} >= {64, 128}


@pytest.mark.parametrize("D", [64, 80])
def test_hf_strided_views_match_the_pointer_kernel(D, monkeypatch, forced):
    """q/k/v as HF hands them over: (B, T, H, D) memory viewed as (B, H, T, D), GQA 6:2, odd T and S; the TMA
    kernel reads them in place and agrees with the pointer kernel on the same views, and with float64."""
    import xlkernels
    from xlkernels import backend
    from xlkernels.reference import attention as ref_attn
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, T, S = 2, 6, 2, 37, 53
    q = torch.randn(B, T, H, D, generator=g).to(TDEV, torch.float16).transpose(1, 2)
    k, v = (torch.randn(B, S, Hkv, D, generator=g).to(TDEV, torch.float16).transpose(1, 2) for _ in range(2))
    gate = (torch.rand(H, generator=g) + 0.5).to(TDEV)
    shift = torch.randn(H, D, generator=g).to(TDEV)
    assert tma.usable(q, k, v)
    with backend("triton"):
        got = xlkernels.steered_attention(q, k, v, gate=gate, shift=shift, causal=True)
        assert len(forced) == 1
        monkeypatch.setattr(tma, "MODE", "0")
        ptr = xlkernels.steered_attention(q, k, v, gate=gate, shift=shift, causal=True)
    assert len(forced) == 1
    ref = ref_attn.attention_raw(q.double(), k.double(), v.double(), causal=True)
    ref = ref * gate.double()[:, None, None] + shift.double()[:, None, :]
    assert torch.isfinite(got).all()
    assert (got.double() - ref).abs().max() <= 2 * (ptr.double() - ref).abs().max() + 1e-3
    if tma.ac.INTERP:  # same blocks in the same order: bit for bit
        assert torch.equal(got, ptr)
    else:  # the autotuner may pick other tiles for the two kernels
        torch.testing.assert_close(got, ptr, atol=2e-3, rtol=0)
