import os

import pytest
import torch

# Triton runs in its interpreter on CPU; this must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()


def pytest_configure(config):
    """A compiled extension that fails to import must fail the run, not quietly drop the `cpu` (and `cuda`)
    parametrizations from collection. XLKERNELS_ALLOW_NO_EXT=1 runs without it on purpose."""
    if os.environ.get("XLKERNELS_ALLOW_NO_EXT") == "1":
        return
    from xlkernels import ext_info
    info = ext_info()
    missing = [k for k in ("cpu",) + (("cuda",) if HAS_GPU else ()) if not info[k]]
    if missing:
        raise pytest.UsageError(f"xlkernels._C has no {'/'.join(missing)} kernels ({info['error']}); "
                                "rebuild with `make build` (or set XLKERNELS_ALLOW_NO_EXT=1 to test without it)")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_memory():
    """Every uninitialised float allocation (C++ kernels' outputs included) starts as NaN, so an element a kernel
    never writes cannot pass. (The Triton wrappers poison their own buffers: xlkernels.triton.grids.POISON.)"""
    det, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
