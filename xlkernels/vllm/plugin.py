"""The `vllm.general_plugins` entry point. vLLM calls `register()` in each of its processes (frontend, engine
core, workers). It wraps request admission (admission.py) and, in worker processes, the model runners
(runners.py); both wrappers do nothing for an engine whose config has no "xlkernels" section, which keeps
every other engine exactly as plain vLLM."""
import logging
import sys

log = logging.getLogger("xlkernels.vllm")


def register() -> None:
    try:
        from . import admission, runners
        admission.patch()
        if "vllm.v1.worker.worker_base" in sys.modules:
            runners.patch()
    except Exception:   # never break an engine that does not use xlkernels
        log.exception("xlkernels.vllm: the plugin could not install its hooks")
