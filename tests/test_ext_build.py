"""How xlkernels._C is found, checked and compiled (xlkernels/_build.py, xlkernels/_ext.py). Cheap: nothing here
compiles torch code; `make pip-check` installs and compiles for real."""
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from xlkernels import _build, _ext

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = __import__("sysconfig").get_config_var("EXT_SUFFIX")


def test_supported_range_is_pyprojects():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = [d.replace(" ", "") for d in deps if re.match(r"torch\b", d)]
    assert torch_dep == [f"torch{_build.SUPPORTED}"]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not [r for r in requires if r.startswith("torch")], "an isolated build would get a torch of its own"


@pytest.mark.parametrize("version", ["2.11.0", "2.11.0a0+git1234", "2.13.0+cpu", "2.14.1+cu130", "2.99.9"])
def test_supported_torch(version):
    _build.check_torch(version)


@pytest.mark.parametrize("version", ["2.10.0", "2.9.1+cu128", "1.13.1", "3.0.0", "3.1.0a0", "", "nightly"])
def test_unsupported_torch_names_the_range(version):
    with pytest.raises(_build.UnsupportedTorch, match=re.escape(f"supports torch >=2.11,<3; this environment "
                                                                f"has torch {version}.")):
        _build.check_torch(version)
    assert issubclass(_build.UnsupportedTorch, ImportError)


def test_unsupported_torch_refused_at_import():
    code = "import torch; torch.__version__ = '2.10.0'; import xlkernels"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1
    assert "UnsupportedTorch: xlkernels supports torch >=2.11,<3; this environment has torch 2.10.0" in r.stderr


def test_env_flags(monkeypatch):
    for value, want in (("", None), ("0", False), ("1", True), (" 1 ", True)):
        monkeypatch.setenv("XLKERNELS_BUILD_CUDA", value)
        assert _build.env_flag("XLKERNELS_BUILD_CUDA") is want
    monkeypatch.setenv("XLKERNELS_BUILD_CUDA", "yes")
    with pytest.raises(ValueError, match="XLKERNELS_BUILD_CUDA must be 0 or 1, got 'yes'"):
        _build.want_cuda("13.0")
    monkeypatch.setenv("XLKERNELS_BUILD_CUDA", "0")
    assert _build.want_cuda("13.0") == (False, "XLKERNELS_BUILD_CUDA=0")


def test_cuda_archs(monkeypatch):
    monkeypatch.delenv("XLKERNELS_CUDA_ARCHS", raising=False)
    assert _build.cuda_archs() == ["80", "90"]
    for value, want in (("80;90", ["80", "90"]), ("8.0 9.0", ["80", "90"]), ("90a", ["90a"]), ("100,120", ["100", "120"])):
        monkeypatch.setenv("XLKERNELS_CUDA_ARCHS", value)
        assert _build.cuda_archs() == want
    assert _build.nvcc_flags(["90a"])[-1] == "-gencode=arch=compute_90a,code=sm_90a"
    for bad in ("sm_90", "9", "hopper", "90;x"):
        monkeypatch.setenv("XLKERNELS_CUDA_ARCHS", bad)
        with pytest.raises(ValueError, match="XLKERNELS_CUDA_ARCHS"):
            _build.cuda_archs()


def _record(**kw):
    rec = _build.build_record(torch.__version__, torch.version.cuda, False, ROOT / "csrc")
    rec.update(kw)
    return rec


@pytest.mark.parametrize("change, why", [
    (None, None),
    ("missing", "has no readable build record"),
    ("garbage", "has no readable build record"),
    ({"torch": "2.14.1+cu130", "torch_cuda": "13.0"}, "was built for torch 2.14.1+cu130 (CUDA 13.0), but this is torch"),
    ({"torch_cuda": "12.8"}, "but this is torch"),
    ({"python": "cpython-312"}, "built for Python cpython-312"),
])
def test_prebuilt_needs_a_record_naming_this_torch(tmp_path, monkeypatch, change, why):
    """A prebuilt _C is opened only when its record names the running torch and Python. (The file here is not a
    library: were it opened, the import would fail, not this test's assertions.)"""
    (tmp_path / f"_C{SUFFIX}").write_bytes(b"not a library")
    if change == "garbage":
        (tmp_path / _build.BUILD_INFO).write_text("{not json")
    elif change != "missing":
        (tmp_path / _build.BUILD_INFO).write_text(json.dumps(_record(**(change or {}))))
    monkeypatch.setattr(_ext, "PKG", tmp_path)
    so, reason = _ext._prebuilt()
    if why is None:
        assert so == tmp_path / f"_C{SUFFIX}" and reason is None
    else:
        assert so is None and why in reason and "not loading it" in reason


def test_no_prebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(_ext, "PKG", tmp_path)
    assert _ext._prebuilt() == (None, "no prebuilt _C")


def test_binary_compiled_for_another_torch_is_refused():
    class Mod:
        TORCH_VERSION = "2.99.0"
    assert "compiled against torch 2.99.0" in _ext._check_binary(Mod)
    Mod.TORCH_VERSION = re.match(r"\d+\.\d+\.\d+", torch.__version__).group(0)
    assert _ext._check_binary(Mod) is None


def _csrc_copy(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", src)
    return src


def test_cache_key_follows_sources_torch_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("XLKERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("XLKERNELS_BUILD_CUDA", raising=False)
    src = _csrc_copy(tmp_path)
    plan = _ext.jit_plan(src)
    assert plan["dir"].parent == tmp_path / "cache" / "ext"
    assert plan["dir"].name.startswith(f"torch-{torch.__version__.replace('+', '-')}-")
    assert _ext.jit_plan(src)["dir"] == plan["dir"]
    (src / "cpu" / "nan.h").write_text((src / "cpu" / "nan.h").read_text() + "\n// changed\n")
    changed = _ext.jit_plan(src)["dir"]
    assert changed != plan["dir"], "a header change must change the cache key"
    (src / "cpu" / "extra.h").write_text("// new\n")
    assert _ext.jit_plan(src)["dir"] not in (plan["dir"], changed), "a new file must change the cache key"
    monkeypatch.setattr(torch, "__version__", "2.12.0+cpu")
    assert _ext.jit_plan(src)["dir"].name.startswith("torch-2.12.0-cpu-")


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XLKERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(_ext.BuildError, match=r"no C\+\+ compiler .*no-such-c\+\+.* XLKERNELS_JIT=0"):
        _ext.compile_ext(_csrc_copy(tmp_path))


def test_compile_error_is_reported(tmp_path, monkeypatch):
    """A source that does not compile: BuildError quoting the compiler's error and naming the full log."""
    monkeypatch.setenv("XLKERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XLKERNELS_BUILD_CUDA", "0")
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "registration.cpp").write_text("int broken( {\n")
    with pytest.raises(_ext.BuildError) as e:
        _ext.compile_ext(src)
    msg = str(e.value)
    assert "compiling xlkernels._C for torch" in msg and "error" in msg and "registration.cpp" in msg
    log = Path(re.search(r"full log: (\S+)\)", msg).group(1))
    assert log.is_file() and "registration.cpp" in log.read_text()
    assert not list((tmp_path / "cache").rglob(_build.BUILD_INFO)), "a failed build must not be cached"


def test_jit_off_and_no_prebuilt_reports_why(tmp_path, monkeypatch):
    monkeypatch.setattr(_ext, "PKG", tmp_path)
    monkeypatch.setattr(_ext, "_INFO", None)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setenv("XLKERNELS_JIT", "0")
    info = _ext.load()
    assert not info["cpu"] and not info["cuda"] and info["how"] is None
    assert "no prebuilt _C" in info["error"] and "XLKERNELS_JIT=0" in info["error"]
    monkeypatch.setattr(_ext, "_INFO", None)
    monkeypatch.setenv("XLKERNELS_JIT", "maybe")
    with pytest.raises(ValueError, match="XLKERNELS_JIT must be 0 or 1"):
        _ext.load()


def test_loaded_extension_reports_its_torch():
    info = _ext.ext_info()
    if not info["cpu"]:
        pytest.skip(f"no _C here: {info['error']}")
    assert info["torch"] == torch.__version__ and info["how"] in ("prebuilt", "cached", "compiled")
    assert os.path.isfile(info["path"])
    assert sys.modules["xlkernels._C"].TORCH_VERSION == re.match(r"\d+\.\d+\.\d+", torch.__version__).group(0)


@pytest.mark.parametrize("smi, want", [("9.0\n12.0\n9.0\n", ["90", "120"]), ("", ["80", "90"]), (None, ["80", "90"])])
def test_visible_archs_from_nvidia_smi(tmp_path, monkeypatch, smi, want):
    """GPU archs come from nvidia-smi (this process must not initialise CUDA); none listed: 80 and 90."""
    if smi is not None:
        (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{smi}'\n")
        (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path) + (os.pathsep + os.environ["PATH"] if smi is not None else ""))
    monkeypatch.setattr(_ext, "_archs_seen", None)
    assert _ext._visible_archs() == want
