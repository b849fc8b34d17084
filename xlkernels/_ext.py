"""Loads the compiled extension xlkernels._C (it registers torch.ops.xlkernels.*), always one built for the torch
that is running. Loading is lazy: the first ext_info() call or op-module import does it.

1. A prebuilt _C next to this file (make build, a wheel built with --no-build-isolation) is loaded only when its
   record, _C_build.json, names the running torch (version, CUDA version, Python). Otherwise it is never opened:
   a C++ extension built against another torch fails on undefined symbols at best.
2. Else _C is compiled on first use from the shipped sources (xlkernels/_csrc in a wheel, csrc/ in a checkout)
   with torch.utils.cpp_extension.load, into a cache keyed by torch, its CUDA version, Python, the flags and a hash
   of the sources: $XLKERNELS_CACHE/ext, default ~/.cache/xlkernels/ext. One line on stderr says so, and a file
   lock keeps two processes from compiling at once. XLKERNELS_JIT=0 turns this off.
If neither works, _C stays None and ext_info()['error'] says why; the ops then run on their other backends.
A torch outside the supported range is refused when xlkernels is imported (UnsupportedTorch, an ImportError).
"""
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch  # loads libtorch before _C

from . import _build

_build.check_torch(torch.__version__)

PKG = Path(__file__).resolve().parent
_lock = threading.RLock()
_C = None
_INFO: "dict | None" = None


class BuildError(RuntimeError):
    """Compiling _C on first use failed or is not possible here."""


def cache_root() -> Path:
    """$XLKERNELS_CACHE/ext, else ~/.cache/xlkernels/ext (honouring $XDG_CACHE_HOME)."""
    base = os.environ.get("XLKERNELS_CACHE")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "xlkernels")
    return Path(os.path.expanduser(base)) / "ext"


def source_root() -> "Path | None":
    """The C++/CUDA sources: xlkernels/_csrc (installed from a wheel or sdist), else the checkout's csrc/."""
    for root in (PKG / "_csrc", PKG.parent / "csrc"):
        if (root / "registration.cpp").is_file():
            return root
    return None


def _prebuilt() -> "tuple[Path | None, str | None]":
    """(path of a prebuilt _C that matches this torch, None) or (None, why there is none to load)."""
    so = next((PKG / f"_C{s}" for s in importlib.machinery.EXTENSION_SUFFIXES if (PKG / f"_C{s}").is_file()), None)
    if so is None:
        return None, "no prebuilt _C"
    record = _build.read_record(PKG / _build.BUILD_INFO)
    if record is None:
        return None, f"the prebuilt {so.name} has no readable build record ({_build.BUILD_INFO}); not loading it"
    why = _build.mismatch(record, torch.__version__, torch.version.cuda)
    if why:
        return None, f"the prebuilt {so.name} was {why}; not loading it"
    return so, None


def _import(path: Path, name: str = "xlkernels._C"):
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


_archs_seen: "list | None" = None


def _visible_archs() -> list:
    """SM architectures of the GPUs nvidia-smi lists (none: the defaults, 80 and 90). Asked of nvidia-smi, not of
    torch.cuda, so that this process does not initialise CUDA (a later fork could then not use it)."""
    global _archs_seen
    if _archs_seen is None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        caps = {m.group(1) + m.group(2) for m in re.finditer(r"^\s*(\d+)\.(\d)\s*$", out, re.M)}
        _archs_seen = sorted(caps, key=int)
    return list(_archs_seen) or list(_build.DEFAULT_ARCHS)


def jit_plan(root: Path) -> dict:
    """What compiling _C here would build and where: {'with_cuda', 'why', 'archs', 'dir', 'record'}. Raises
    ValueError on malformed XLKERNELS_* settings."""
    with_cuda, why = _build.want_cuda(torch.version.cuda)
    archs = _build.cuda_archs(default=_visible_archs()) if with_cuda else []
    record = _build.build_record(torch.__version__, torch.version.cuda, with_cuda, root, archs)
    record["flags"] = [_build.CXX_FLAGS, _build.LD_FLAGS, _build.nvcc_flags(archs) if with_cuda else []]
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    label = f"torch-{torch.__version__}".replace("+", "-") + ("-cuda" if with_cuda else "")
    return {"with_cuda": with_cuda, "why": why, "archs": archs, "dir": cache_root() / f"{label}-{key}",
            "record": record}


class _FileLock:
    """An exclusive flock on `path` (released by the OS if the process dies), announcing a wait on stderr."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = path, what, None

    def __enter__(self):
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"xlkernels: waiting for another process {self.what} (lock {self.path})", file=sys.stderr,
                  flush=True)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock


def _cpp_extension(with_cuda: bool):
    """torch.utils.cpp_extension, imported with CUDA_HOME set to the real toolkit (torch guesses it from nvcc's
    directory at import and warns when that is a wrapper's)."""
    if "torch.utils.cpp_extension" in sys.modules or not with_cuda or os.environ.get("CUDA_HOME"):
        from torch.utils import cpp_extension
        return cpp_extension
    os.environ["CUDA_HOME"] = _build.find_cuda_home() or ""
    try:
        from torch.utils import cpp_extension
    finally:
        del os.environ["CUDA_HOME"]
    return cpp_extension


def _ninja_path(ce) -> str:
    """PATH for the build: as it is when ninja is on it, else with the ninja of the `ninja` package (pip puts it
    in the venv's bin/, which is not on PATH when the venv is not activated)."""
    path = os.environ.get("PATH", "")
    if ce.is_ninja_available():
        return path
    try:
        import ninja
        bin_dir = getattr(ninja, "BIN_DIR", os.path.dirname(sys.executable))
    except ImportError:
        bin_dir = os.path.dirname(sys.executable)
    if shutil.which("ninja", path=bin_dir) is None:
        raise BuildError("compiling xlkernels._C needs ninja: pip install ninja")
    return bin_dir + os.pathsep + path


def compile_ext(root: Path, note: "str | None" = None):
    """Load _C from the cache for this torch and these sources, compiling it first if needed. Returns
    (module, record, 'cached' | 'compiled'). Raises BuildError (or ValueError for a bad XLKERNELS_* setting)."""
    plan = jit_plan(root)
    out: Path = plan["dir"]
    done = out / _build.BUILD_INFO
    record = _build.read_record(done)
    if record is not None and (out / record.get("lib", "")).is_file():
        return _import(out / record["lib"]), record, "cached"
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler ({cxx}) found to compile xlkernels._C for torch {torch.__version__}: "
                         "install one (e.g. apt-get install g++) or set CXX; XLKERNELS_JIT=0 skips compiling")
    ce = _cpp_extension(plan["with_cuda"])
    path_env = _ninja_path(ce)
    with _FileLock(out.parent / f"{out.name}.lock", f"compiling xlkernels._C into {out}"):
        record = _build.read_record(done)
        if record is not None and (out / record.get("lib", "")).is_file():  # another process just built it
            return _import(out / record["lib"]), record, "cached"
        out.mkdir(parents=True, exist_ok=True)
        (out / "lock").unlink(missing_ok=True)  # torch's own build baton, left behind by a killed process
        if note:
            print(f"xlkernels: {note}", file=sys.stderr, flush=True)
        kind = f"CPU + CUDA kernels for sm_{', sm_'.join(plan['archs'])}" if plan["with_cuda"] else "CPU kernels"
        print(f"xlkernels: compiling the C++ extension for torch {torch.__version__} ({kind}; {plan['why']}). "
              f"First use only, about 1 minute (a few with CUDA); cached in {out}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        cflags = _build.CXX_FLAGS + (["-DXLK_WITH_CUDA"] if plan["with_cuda"] else [])
        old_home, old_path = ce.CUDA_HOME, os.environ.get("PATH", "")
        if plan["with_cuda"]:
            ce.CUDA_HOME = _build.find_cuda_home() or old_home  # torch's guess trusts nvcc's dir (maybe a wrapper)
        os.environ["PATH"] = path_env
        try:
            path = ce.load(name="_C", sources=[str(s) for s in _build.sources(root, plan["with_cuda"])],
                           extra_cflags=cflags, extra_cuda_cflags=_build.nvcc_flags(plan["archs"]),
                           extra_ldflags=_build.LD_FLAGS, build_directory=str(out), with_cuda=plan["with_cuda"],
                           is_python_module=False, verbose=False)
        except Exception as e:  # compiler errors arrive as RuntimeError with the compiler's output
            log = out / "build.log"
            log.write_text(f"{e}\n")
            lines = str(e).strip().splitlines()
            shown = [ln for ln in lines if re.search(r"\berror\b", ln, re.I)][:8] or lines[-12:]
            raise BuildError(f"compiling xlkernels._C for torch {torch.__version__} failed (full log: {log}):\n"
                             + "\n".join(shown)) from None
        finally:
            ce.CUDA_HOME = old_home
            os.environ["PATH"] = old_path
        record = dict(plan["record"], lib=os.path.basename(path))
        mod = _import(Path(path))
        done.write_text(json.dumps(record, indent=1))
        print(f"xlkernels: compiled in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        return mod, record, "compiled"


def _check_binary(mod) -> "str | None":
    """The loaded binary's own word on the torch it was compiled against (torch/version.h)."""
    built = getattr(mod, "TORCH_VERSION", None)
    running = re.match(r"\d+\.\d+\.\d+", str(torch.__version__))
    if built is not None and running is not None and built != running.group(0):
        return f"xlkernels._C was compiled against torch {built} but torch {running.group(0)} is running"
    return None


def load() -> dict:
    """Load _C once (see the module docstring); returns ext_info()."""
    global _C, _INFO
    with _lock:
        if _INFO is not None:
            return _INFO
        mod, record, how, errors, note = None, None, None, [], None
        so, why = _prebuilt()
        if so is None and why != "no prebuilt _C":
            note = why
        if so is not None:
            try:
                mod = importlib.import_module("xlkernels._C")
                record, how = _build.read_record(PKG / _build.BUILD_INFO), "prebuilt"
            except ImportError as e:
                note = f"the prebuilt {so.name} failed to load ({e})"
                errors.append(note)
        else:
            errors.append(why)
        if mod is None:
            try:
                jit = _build.env_flag("XLKERNELS_JIT")
                root = source_root()
                if jit is False:
                    errors.append("compiling on first use is off (XLKERNELS_JIT=0)")
                elif root is None:
                    errors.append("its C++ sources are not installed (xlkernels/_csrc)")
                else:
                    mod, record, how = compile_ext(root, note=note)
                    errors = []
            except (BuildError, OSError, ImportError) as e:  # a bad XLKERNELS_* setting (ValueError) is raised
                errors.append(str(e))
                warnings.warn(f"xlkernels._C is not available; ops fall back to their other backends: {e}",
                              RuntimeWarning, stacklevel=2)
        if mod is not None and _check_binary(mod):
            errors, mod = [_check_binary(mod)], None
        _C = mod
        error = None if mod is not None else "; ".join(errors or ["not built"])
        _INFO = {"cpu": mod is not None, "cuda": bool(mod is not None and mod.WITH_CUDA), "error": error,
                 "torch": record.get("torch") if mod is not None and record else None,
                 "how": how if mod is not None else None,
                 "path": getattr(mod, "__file__", None) if mod is not None else None, "note": note}
        return _INFO


def ext_info() -> dict:
    """What the compiled extension holds, loading (or compiling) it on the first call: {'cpu': bool, 'cuda': bool,
    'error': str | None, 'torch': the torch it was built against, 'how': 'prebuilt' | 'cached' | 'compiled',
    'path': the loaded file, 'note': why a prebuilt _C was passed over, or None}."""
    return dict(load())
