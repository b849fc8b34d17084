"""Hooks on vLLM's model runners: V1 (vllm/v1/worker/gpu_model_runner.py, and its CPU subclass) and V2
(vllm/v1/worker/gpu/model_runner.py, which the CPU V2 runner subclasses). `patch()` wraps a few methods at
class level; each wrapper does nothing for an engine without an "xlkernels" config section.

- load_model: install (install.py) once the model is loaded, before warm-up, compilation and capture.
- dummy runs, profiling and graph capture: every token gets identity rows (state.identity).
- V1: `_model_forward` fills the per-token rows and groups from the persistent batch (input_batch.req_ids,
  query_start_loc) before each real forward; a request's (row, group) is resolved once and cached.
- V2: a per-slot table of (row, group) is kept where requests are added (add_requests) and removed
  (_remove_request); `prepare_inputs` fills the per-token buffers from the step's idx_mapping and scheduled
  token counts, padding to num_tokens_after_padding with -1.
"""
from __future__ import annotations

import functools

import numpy as np

from .install import install
from .plans import resolve


def _state(runner):
    return getattr(runner, "_xlk_state", None)


def _wrap(cls, name, make):
    fn = cls.__dict__.get(name)
    if fn is None or getattr(fn, "_xlk", False):
        return
    new = functools.wraps(fn)(make(fn))
    new._xlk = True
    setattr(cls, name, new)


# ---------------------------------------------------------------------------------------------- both runners
def _load_model(orig):
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        if _state(self) is None:
            self._xlk_state = install(self)
            if self._xlk_state is not None and hasattr(self, "req_states"):
                n = int(self.req_states.max_num_reqs)
                self._xlk_slots = np.full((n, 2), -1, dtype=np.int64)
        return out
    return load_model


def _identity_during(orig):
    def run(self, *args, **kwargs):
        s = _state(self)
        if s is not None:
            s.identity()
        try:
            return orig(self, *args, **kwargs)
        finally:
            if s is not None:
                s.identity()
    return run


# ---------------------------------------------------------------------------------------------- V1
def _v1_model_forward(orig):
    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
        s = _state(self)
        if s is not None:
            padded = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            v1_fill(self, s, padded)
        return orig(self, input_ids=input_ids, positions=positions, intermediate_tensors=intermediate_tensors,
                    inputs_embeds=inputs_embeds, **kw)
    return _model_forward


def v1_fill(runner, s, padded: int) -> None:
    batch = runner.input_batch
    n_req = batch.num_reqs
    cache = runner.__dict__.setdefault("_xlk_req_cache", {})
    per_req = np.empty((n_req, 2), dtype=np.int64)
    for i, req_id in enumerate(batch.req_ids[:n_req]):
        st = runner.requests.get(req_id)
        params = st.sampling_params if st is not None else None
        hit = cache.get(req_id)
        if hit is None or hit[0] is not params:
            hit = cache[req_id] = (params, resolve(s, getattr(params, "extra_args", None)))
        per_req[i] = hit[1]
    if len(cache) > 4 * max(n_req, 1024):
        live = set(batch.req_ids[:n_req])
        for k in [k for k in cache if k not in live]:
            del cache[k]
    qsl = np.asarray(runner.query_start_loc.cpu[:n_req + 1])
    counts = np.diff(qsl)
    s.fill(np.repeat(per_req[:, 0], counts), np.repeat(per_req[:, 1], counts), padded)


# ---------------------------------------------------------------------------------------------- V2
def _v2_add_requests(orig):
    def add_requests(self, scheduler_output):
        out = orig(self, scheduler_output)
        s = _state(self)
        if s is not None:
            for new in scheduler_output.scheduled_new_reqs:
                slot = self.req_states.req_id_to_index[new.req_id]
                self._xlk_slots[slot] = resolve(s, getattr(new.sampling_params, "extra_args", None))
        return out
    return add_requests


def _v2_remove_request(orig):
    def _remove_request(self, req_id):
        if _state(self) is not None:
            slot = self.req_states.req_id_to_index.get(req_id)
            if slot is not None:
                self._xlk_slots[slot] = -1
        return orig(self, req_id)
    return _remove_request


def _v2_prepare_inputs(orig):
    def prepare_inputs(self, *args, **kwargs):
        batch = orig(self, *args, **kwargs)
        s = _state(self)
        if s is not None:
            v2_fill(self._xlk_slots, batch, s)
        return batch
    return prepare_inputs


def v2_fill(slots, batch, s) -> None:
    per_req = slots[np.asarray(batch.idx_mapping_np[:batch.num_reqs])]
    counts = np.asarray(batch.num_scheduled_tokens[:batch.num_reqs])
    if int(counts.sum()) != batch.num_tokens:
        raise RuntimeError(f"xlkernels.vllm: the step runs {batch.num_tokens} tokens but {int(counts.sum())} were "
                           "scheduled; per-request rows cannot be placed")
    s.fill(np.repeat(per_req[:, 0], counts), np.repeat(per_req[:, 1], counts), batch.num_tokens_after_padding)


def _v2_execute_model(orig):
    def execute_model(self, scheduler_output, *args, **kwargs):
        dummy = kwargs.get("dummy_run", args[1] if len(args) > 1 else False)
        s = _state(self)
        if s is not None and dummy:
            s.identity()
        return orig(self, scheduler_output, *args, **kwargs)
    return execute_model


# ---------------------------------------------------------------------------------------------- patching
def patch() -> None:
    """Wrap the runner methods (idempotent). Engines without an xlkernels config are unaffected."""
    from vllm.v1.worker import gpu_model_runner as v1
    from vllm.v1.worker.gpu import model_runner as v2
    v1_classes = [v1.GPUModelRunner]
    try:
        from vllm.v1.worker import cpu_model_runner as v1cpu
        v1_classes.append(v1cpu.CPUModelRunner)
    except ImportError:   # a GPU build without the CPU runner
        pass
    for cls in v1_classes + [v2.GPUModelRunner]:
        _wrap(cls, "load_model", _load_model)
        for name in ("_dummy_run", "capture_model", "profile_run"):
            _wrap(cls, name, _identity_during)
    _wrap(v1.GPUModelRunner, "_model_forward", _v1_model_forward)
    _wrap(v2.GPUModelRunner, "add_requests", _v2_add_requests)
    _wrap(v2.GPUModelRunner, "_remove_request", _v2_remove_request)
    _wrap(v2.GPUModelRunner, "prepare_inputs", _v2_prepare_inputs)
    _wrap(v2.GPUModelRunner, "execute_model", _v2_execute_model)

