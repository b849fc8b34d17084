"""Triton kernels past 32-bit offsets and at grid sizes beyond CUDA's axis limits.

Offsets: inputs are strided views over large untouched storages (no memory is committed), so element offsets
pass 2**31 at a few rows; each case runs in a subprocess, where a wrapped int32 offset segfaults the interpreter.
Grids: the grid functions are checked at huge sizes (the folded grids also run at small size, with a lowered
AXIS_MAX, in the attention and glu tests).
"""
import os
import subprocess
import sys

import pytest
import torch

from xlkernels import backends
from xlkernels.triton import attention_common as ta
from xlkernels.triton import attention_decode as td
from xlkernels.triton import glu as tg
from xlkernels.triton import grids
from xlkernels.triton import head_steer as th
from xlkernels.triton import neuron_stats as tns

interpreter_only = pytest.mark.skipif(backends.triton_available() is not None or torch.cuda.is_available(),
                                      reason="runs the Triton interpreter on CPU")

BIG = r'''
import sys
import torch
import xlkernels
from xlkernels.reference import attention as ra
from xlkernels.reference.head_steer import head_steer as rh


def strided(shape, strides, dtype=torch.float16):
    """A random view with these strides over an untouched storage just large enough."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    x = torch.empty(size, dtype=dtype).as_strided(shape, strides)
    x.copy_(torch.randn(shape))
    return x


def check(names, got, want):
    for name, a, b in zip(names, got, want):
        err = float((a.double() - b).abs().max() / b.abs().max())
        assert err < 5e-3, (name, err)


def attention(B, H, Hkv, T, S, D, q_row, kv_row):
    # (batch, head) strides small, row strides large: row i of q starts at i * q_row elements
    q = strided((B, H, T, D), (D * H, D, q_row, 1))
    k = strided((B, Hkv, S, D), (D * Hkv, D, kv_row, 1))
    v = strided((B, Hkv, S, D), (D * Hkv, D, kv_row, 1))
    gate, shift = torch.rand(B, H) + 0.5, torch.randn(H, D)
    leaves = [x.requires_grad_() for x in (q, k, v, gate, shift)]
    do = strided((B, H, T, D), (D * H, D, q_row, 1))  # the upstream gradient too
    with xlkernels.backend("triton"):
        out = xlkernels.steered_attention(q, k, v, gate=gate, shift=shift)
    got = (out, *torch.autograd.grad(out, leaves, do))
    l64 = [x.detach().double().requires_grad_() for x in leaves]
    want = ra.steered_attention(*l64[:3], gate=l64[3], shift=l64[4])
    check(("out", "q", "k", "v", "gate", "shift"), got, (want, *torch.autograd.grad(want, l64, do.double())))


def head_steer(B, T, H, D, batch_stride):
    o = strided((B, T, H, D), (batch_stride, H * D, D, 1))
    gate, shift = torch.rand(B, H) + 0.5, torch.randn(H, D)
    leaves = [x.requires_grad_() for x in (o, gate, shift)]
    dout = torch.randn(B, T, H, D).half()
    with xlkernels.backend("triton"):
        out = xlkernels.head_steer(o, gate, shift)
    got = (out, *torch.autograd.grad(out, leaves, dout))
    l64 = [x.detach().double().requires_grad_() for x in leaves]
    want = rh(*l64)
    check(("out", "o", "gate", "shift"), got, (want, *torch.autograd.grad(want, l64, dout.double())))


R27, R30 = 2 ** 27 + 64, 2 ** 30 + 64
case = sys.argv[1]
if case == "prefill":  # T = S = 17: rows 16 start past 2**31 (forward, dq, dk/dv, preprocess kernels)
    attention(1, 2, 1, 17, 17, 16, R27, R27)
elif case == "decode":  # split-KV decode: query rows 2 and key rows 16 past 2**31
    attention(1, 4, 2, 3, 17, 16, R30, R27)
elif case == "head_steer":  # batch 2 starts past 2**31 (backward reads o by batch stride)
    head_steer(3, 5, 2, 16, R30)
print("ok")
'''


@interpreter_only
@pytest.mark.parametrize("case", ["prefill", "decode", "head_steer"])
def test_offsets_past_2_31(case):
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", BIG, case], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, f"exit {r.returncode}: {r.stderr[-2000:]}"


LIMITS = (2 ** 31 - 1, grids.AXIS_MAX, grids.AXIS_MAX)


def assert_fits(grid, n0=None, n=None):
    """Every axis within CUDA's limits; axis 0 is n0 and axes 1 x 2 cover n (when given)."""
    grid = tuple(grid) + (1,) * (3 - len(grid))
    assert all(1 <= g <= m for g, m in zip(grid, LIMITS)), grid
    if n0 is not None:
        assert grid[0] == n0, grid
    if n is not None:
        assert n <= grid[1] * grid[2] < n + grid[2], grid  # covered, with fewer than z spare programs


HUGE = [(1, 1), (17, 65535), (131072, 65536), (2 ** 20, 2 ** 22), (3, 2 ** 31 - 1)]


@pytest.mark.parametrize("rows,heads", HUGE)
def test_attention_grids(rows, heads):
    for block in (16, 32, 64, 128):
        assert_fits(ta.row_grid(rows, heads, block), -(-rows // block), heads)
    for sms in (None, 1, 132):
        nsplit, split_len = td.splits(heads, rows, 64, sms)
        assert 1 <= nsplit <= 128 and (nsplit - 1) * split_len < rows <= nsplit * split_len
        split_grid, combine_grid = td.decode_grids(heads, nsplit, heads, 16)  # combine: rows x column blocks
        assert_fits(split_grid, nsplit, heads)
        assert_fits(combine_grid, heads)


@pytest.mark.parametrize("n,nn", [(1, 1), (1_048_561, 128), (2 ** 27, 14336), (2 ** 31 - 1, 3)])
def test_glu_and_stats_grids(n, nn):
    for bi in (128, 1024):
        assert_fits(tg.bwd_grid(n, nn, 16, bi), -(-nn // bi), -(-n // 16))
        for sms in (None, 1, 132, 1000):
            gx, gy, rows = tns.grid_shape(n, nn, 16, bi, sms)
            assert_fits((gx, gy))
            assert gx == -(-nn // bi) and (gy - 1) * rows < n <= gy * rows


@pytest.mark.parametrize("B,T,H", [(1, 1, 1), (4096, 8192, 64), (65536, 3, 2), (1, 2 ** 24, 128)])
def test_head_steer_grids(B, T, H):
    assert_fits(th.fwd_grid(B * T * H, 16))
    for sms in (None, 1, 132):
        grid, chunk = th.bwd_grid(B, H, T, 32, sms)
        assert_fits(grid, B * H)
        assert (grid[1] - 1) * chunk < T <= grid[1] * chunk


def test_fold_rejects_what_no_grid_holds():
    with pytest.raises(ValueError, match="limits"):
        grids.fold(1, grids.AXIS_MAX ** 2 + 1)
