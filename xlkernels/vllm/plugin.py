"""The `vllm.general_plugins` entry point. vLLM calls `register()` in each of its processes (main, engine core,
workers); it does nothing unless XLKERNELS_VLLM=1, which `xlkernels.vllm.LLM` sets before the engine starts."""
import os

ENV = "XLKERNELS_VLLM"


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def register() -> None:
    if not enabled():
        return
    from . import _hooks
    _hooks.install()
