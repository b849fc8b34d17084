"""Launch shapes of the CUDA kernels (csrc/cuda/launch.h, plain C++) against the CUDA limits, on CPU: block sizes
in [1, 1024], grid y <= 65535, vector widths that fit the alignment, and full coverage of D and of the rows, for
odd, aligned and huge sizes (driver: tests/cuda_launch_check.cpp, built with g++)."""
import pathlib
import shutil
import subprocess

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_cuda_launch_shapes(tmp_path):
    exe = tmp_path / "cuda_launch_check"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "cuda_launch_check.cpp"), "-o", str(exe)], check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith(" 0 failed"), r.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [3, 1025, 4097, 6000, 8193, 8200])
def test_head_steer_backward_any_head_dim(D, dtype):
    """The CUDA backward for head dims past one block of vectors (once cudaErrorInvalidValue), against float64."""
    B, T, H = 2, 5, 3
    o = torch.randn(B, T, H, D, device="cuda").to(dtype)
    grad = torch.randn(B, T, H, D, device="cuda").to(dtype)
    gate = torch.rand(B, H, device="cuda")
    gate[0, 1] = 0
    shift = torch.randn(H, D, device="cuda")
    go, gg, gs = torch.ops.xlkernels.head_steer_backward(grad, o, gate, shift, True, True, True)
    g64, o64 = grad.double(), o.double()
    ref_o = torch.where(gate[:, None, :, None] == 0, 0.0, gate[:, None, :, None].double() * g64)
    torch.testing.assert_close(go.double(), ref_o, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gg.double(), (g64 * o64).sum((1, 3)), rtol=1e-4, atol=1e-3 * D ** 0.5)
    torch.testing.assert_close(gs.double(), g64.sum((0, 1)), rtol=1e-4, atol=1e-4)
