"""Load a model and tokenizer from a local directory or a .gguf file. Never touches the network."""
import os
import sys
from pathlib import Path

import torch

NO_NETWORK = ("xlkernels never downloads models (no network is used). Pass a local directory holding "
              "config.json, the weights and the tokenizer files (e.g. fetched beforehand with "
              "`huggingface-cli download ID --local-dir DIR`), or a .gguf file; omit the path to use "
              "the embedded default model (Gemma-3-270M).")


def resolve_path(path):
    """-> (directory, gguf file name or None). A missing, empty or corrupt path raises
    xlkernels.files.FileError (MissingFileError, a FileNotFoundError, when it does not exist)."""
    from xlkernels.files import FileError, MissingFileError, read_json
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise FileError(p, "a file but not a .gguf file; pass a model directory or a .gguf file")
        _check_gguf(p)
        return p.parent, p.name
    if p.is_dir():
        if (p / "config.json").is_file():
            if not isinstance(read_json(p / "config.json"), dict):
                raise FileError(p / "config.json", "not a JSON object (a model config)")
            return p, None
        ggufs = sorted(q.name for q in p.glob("*.gguf"))
        if len(ggufs) == 1:
            _check_gguf(p / ggufs[0])
            return p, ggufs[0]
        what = f"several .gguf files ({', '.join(ggufs)}); pass one of them" if ggufs else \
            "no config.json and no .gguf file"
        raise FileError(p, f"model directory has {what}")
    raise MissingFileError(path, f"model path does not exist. {NO_NETWORK}")


def _check_gguf(path):
    """Raise FileError unless `path` starts like a GGUF file and its header and tensor table are whole."""
    from xlkernels.files import FileError, check_file
    check_file(path, empty_ok=False)
    with open(path, "rb") as f:
        head = f.read(24)   # magic, version, tensor count, key-value count
    if head[:4] != b"GGUF":
        raise FileError(path, f"not a GGUF file (starts with {head[:4]!r}, not b'GGUF')")
    if len(head) < 24:
        raise FileError(path, f"truncated GGUF file ({len(head)} bytes, the header alone is 24)")
    try:
        from gguf import GGUFReader
    except ImportError:
        return
    try:
        GGUFReader(os.fspath(path))
    except Exception as e:   # the reader's numpy views fail on a truncated file
        raise FileError(path, f"truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None


def prepare_tokenizer(tok):
    """Make a tokenizer batch-ready: a pad token (eos if none, as MEXA does)."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(path, dtype=torch.float32, device="cpu", device_map=None, tokenizer=True):
    """(model, tokenizer) from a local model directory or a .gguf file (dequantized to `dtype`).

    Only local files are read (local_files_only=True); a hub id raises FileNotFoundError explaining how
    to pass a local path. `device_map` (e.g. "auto", needs accelerate) overrides `device`.
    The model is returned in eval mode; the tokenizer gets a pad token (eos) if it has none.
    """
    from transformers import AutoTokenizer
    directory, gguf = resolve_path(path)
    kw = {"local_files_only": True}
    if gguf:
        kw["gguf_file"] = gguf
        print(f"xlkernels: dequantizing {directory / gguf} (slow; xlkernels.models.save_model(model, tok, DIR) "
              "writes safetensors that reload fast)", file=sys.stderr)
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(directory, **kw)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"no usable tokenizer in {str(directory)!r} ({e}); save one there with "
                             "tokenizer.save_pretrained(dir)") from e
        prepare_tokenizer(tok)
    return from_pretrained(directory, kw, dtype, device, device_map), tok


def from_pretrained(directory, kw, dtype, device, device_map=None):
    """AutoModelForCausalLM from `directory` (kw: from_pretrained options) in `dtype`, moved to `device` unless
    `device_map` places it; in eval mode."""
    from transformers import AutoModelForCausalLM
    mkw = dict(kw, dtype=dtype)
    if device_map is not None:
        mkw["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(directory, **mkw)
    if device_map is None:
        model.to(device)
    return model.eval()


def _plain_copy(model):
    """A non-GGUF copy of `model` sharing its tensors (save_pretrained refuses GGUF-loaded models)."""
    from transformers import AutoModelForCausalLM
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = model.dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def save_model(model, tok, directory):
    """Save model (also one loaded from a .gguf) + tokenizer as safetensors that load_model reads fast."""
    directory = Path(os.path.expanduser(os.fspath(directory)))
    plain = _plain_copy(model) if getattr(model.config, "quantization_config", None) is not None else model
    plain.save_pretrained(directory)
    if tok is not None:
        tok.save_pretrained(directory)
    return directory
