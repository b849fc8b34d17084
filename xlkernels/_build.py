"""How xlkernels._C is built, shared by setup.py (ahead of time) and xlkernels._ext (on first use).

Imports nothing outside the standard library at module level: setup.py loads this file by path, in a build
environment that may have no torch.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

# The torch releases the extension supports. pyproject.toml says the same (`torch>=2.11,<3`; a test checks).
TORCH_MIN = (2, 11)
TORCH_BELOW = (3, 0)
SUPPORTED = f">={TORCH_MIN[0]}.{TORCH_MIN[1]},<{TORCH_BELOW[0]}"

# Written next to an ahead-of-time build of _C: the torch it was built against. No record, no load.
BUILD_INFO = "_C_build.json"

CXX_FLAGS = ["-O3", "-fopenmp", "-DAT_PER_OPERATOR_HEADERS"]  # per-operator ATen headers: ~10 s a file, not ~42
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
DEFAULT_ARCHS = ("80", "90")
_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


class UnsupportedTorch(ImportError):
    """The installed torch is outside the range xlkernels supports."""


def torch_release(version: str) -> "tuple[int, int] | None":
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_torch(version: str) -> None:
    """Raise UnsupportedTorch, naming the supported range, unless torch `version` is in it."""
    rel = torch_release(version)
    if rel is None or not TORCH_MIN <= rel < TORCH_BELOW:
        raise UnsupportedTorch(
            f"xlkernels supports torch {SUPPORTED}; this environment has torch {version}. "
            f"Install a supported release, e.g. pip install 'torch{SUPPORTED}'.")


def env_flag(name: str) -> "bool | None":
    """None when unset or empty, else True for '1' and False for '0'; anything else is a ValueError."""
    value = os.environ.get(name, "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def cuda_archs(default=DEFAULT_ARCHS) -> list:
    """SM architectures for nvcc, from XLKERNELS_CUDA_ARCHS ('80;90', '8.0 9.0' or '90a') or `default`."""
    env = os.environ.get("XLKERNELS_CUDA_ARCHS", "").strip()
    if not env:
        return list(default)
    archs = []
    for item in re.split(r"[;,\s]+", env):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)", item)
        if m is None:
            raise ValueError(f"XLKERNELS_CUDA_ARCHS: {item!r} is not an SM architecture such as 80, 9.0 or 90a "
                             f"(got {env!r})")
        archs.append(f"{m.group(1)}{m.group(2)}{m.group(3)}")
    return archs


def nvcc_flags(archs) -> list:
    return NVCC_FLAGS + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def sources(root, with_cuda: bool) -> list:
    """The translation units of _C under `root` (the csrc directory), sorted."""
    root = Path(root)
    files = sorted(root.glob("*.cpp")) + sorted(root.glob("cpu/*.cpp"))
    if with_cuda:
        files += sorted(root.glob("cuda/*.cu")) + sorted(root.glob("cuda/*.cpp"))
    return files


def source_hash(root) -> str:
    """sha256 over the names and contents of every source and header under `root`."""
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _SUFFIXES):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def _nvcc() -> "str | None":
    return shutil.which(os.environ.get("NVCC") or "nvcc")


def _has_toolkit(home) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def find_cuda_home() -> "str | None":
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else where nvcc really lives (it may be a wrapper script
    outside the toolkit, which torch's own guess takes for the root), else /usr/local/cuda; None if none has
    include/cuda_runtime.h."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if _has_toolkit(os.environ[var]) else None
    nvcc = _nvcc()
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _has_toolkit(home):
            return home
        try:  # a wrapper: ask nvcc where its toolkit is
            out = subprocess.run([nvcc, "-v", "-x", "cu", "-E", os.devnull], capture_output=True, text=True,
                                 timeout=60).stderr
            m = re.search(r"^#\$ TOP=(.*)$", out, re.M)
            if m and _has_toolkit(os.path.realpath(m.group(1).strip())):
                return os.path.realpath(m.group(1).strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return "/usr/local/cuda" if _has_toolkit("/usr/local/cuda") else None


def want_cuda(torch_cuda: "str | None") -> "tuple[bool, str]":
    """(build the CUDA kernels?, why). XLKERNELS_BUILD_CUDA=0|1 decides; else yes when torch is a CUDA build and a
    CUDA toolkit (nvcc and its headers) is found."""
    forced = env_flag("XLKERNELS_BUILD_CUDA")
    if forced is not None:
        return forced, f"XLKERNELS_BUILD_CUDA={int(forced)}"
    if torch_cuda is None:
        return False, "torch is a CPU build"
    if find_cuda_home() is None or _nvcc() is None:
        return False, "no CUDA toolkit found (nvcc and include/cuda_runtime.h; set CUDA_HOME)"
    return True, f"torch is a CUDA {torch_cuda} build and the CUDA toolkit is at {find_cuda_home()}"


def python_tag() -> str:
    return f"{sys.implementation.cache_tag}-{sysconfig.get_config_var('EXT_SUFFIX')}"


def build_record(torch_version: str, torch_cuda: "str | None", with_cuda: bool, root, archs=()) -> dict:
    return {"torch": str(torch_version), "torch_cuda": torch_cuda, "with_cuda": bool(with_cuda),
            "cuda_archs": list(archs) if with_cuda else [], "python": python_tag(), "sources": source_hash(root)}


def mismatch(record: dict, torch_version: str, torch_cuda: "str | None") -> "str | None":
    """None if a build with `record` was made for this torch and Python, else how it differs."""
    if record.get("torch") != str(torch_version) or record.get("torch_cuda") != torch_cuda:
        cuda = f" (CUDA {record.get('torch_cuda')})" if record.get("torch_cuda") else ""
        return f"built for torch {record.get('torch')}{cuda}, but this is torch {torch_version}"
    if record.get("python") != python_tag():
        return f"built for Python {record.get('python')}, but this is {python_tag()}"
    return None


def read_record(path) -> "dict | None":
    try:
        with open(path) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None
