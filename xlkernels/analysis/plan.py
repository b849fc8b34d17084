"""A saved steering plan: head gates, head shifts (one vector or a language bank), neuron deactivations.

On disk: `<name>.safetensors` (tensors, plus the metadata JSON under the key "xlkernels_plan") and a
`<name>.json` copy of the metadata for people. No pickle. `save(path)` with a directory writes
`plan.safetensors` + `plan.json` inside it. `load(path, model=...)` checks every shape and neuron index
against the model (a Steerer or an HF model) and raises ValueError naming the field.

Tensors: "gate" (L,H); "shift" (L,H,D) or (K,L,H,D) with one row per name in `languages`;
"neurons.<layer>" (n,) int64 for each deactivated layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "xlkernels-steering-plan"
VERSION = 1
_META_KEY = "xlkernels_plan"


def model_dims(model) -> dict:
    """{"num_layers","num_heads","head_dim","num_neurons"} of a Steerer or an HF model/config."""
    if all(hasattr(model, a) for a in ("num_layers", "num_heads", "head_dim")):
        return {"num_layers": int(model.num_layers), "num_heads": int(model.num_heads),
                "head_dim": int(model.head_dim), "num_neurons": int(getattr(model, "num_neurons", 0) or 0)}
    cfg = getattr(model, "config", model)
    cfg = getattr(cfg, "text_config", None) or cfg
    H = int(cfg.num_attention_heads)
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    return {"num_layers": int(cfg.num_hidden_layers), "num_heads": H, "head_dim": int(D),
            "num_neurons": int(getattr(cfg, "intermediate_size", 0) or 0)}


def model_meta(model) -> dict:
    """Plan metadata from a Steerer or HF model: name, arch and dims."""
    hf = getattr(model, "model", None) if hasattr(model, "num_layers") else model
    cfg = getattr(hf, "config", None)
    meta = dict(model_dims(model))
    meta["model"] = str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "") or "")
    meta["arch"] = str(getattr(cfg, "model_type", "") or "")
    return meta


@dataclass
class SteeringPlan:
    gate: torch.Tensor | None = None          # (L,H)
    shift: torch.Tensor | None = None         # (L,H,D) or (K,L,H,D) bank
    alpha: float = 1.0
    neurons: dict = field(default_factory=dict)   # {layer: LongTensor idx}
    languages: list = field(default_factory=list)  # bank row names when shift is (K,L,H,D)
    meta: dict = field(default_factory=dict)  # model, arch, num_layers, num_heads, head_dim, num_neurons, ...

    # ------------------------------------------------------------------------------ checks
    def dims(self) -> dict:
        return {k: self.meta.get(k) for k in ("num_layers", "num_heads", "head_dim", "num_neurons")}

    def validate(self, dims: dict | None = None):
        """Check the tensors against dims (default: the plan's own metadata); ValueError names the field."""
        d = dict(self.dims())
        if dims:
            for k, v in dims.items():
                if d.get(k) not in (None, 0) and v and d[k] != v:
                    raise ValueError(f"plan was made for {k}={d[k]}, the model has {k}={v}")
                if v:
                    d[k] = v
        L, H, D, I = d["num_layers"], d["num_heads"], d["head_dim"], d["num_neurons"]
        if self.gate is not None:
            _shape("gate", self.gate, (L, H))
        if self.shift is not None:
            if self.shift.dim() == 4:
                _shape("shift", self.shift, (None, L, H, D))
                if len(self.languages) != self.shift.shape[0]:
                    raise ValueError(f"shift bank has {self.shift.shape[0]} rows but languages has "
                                     f"{len(self.languages)} names")
            else:
                _shape("shift", self.shift, (L, H, D))
        for layer, idx in self.neurons.items():
            if L and not 0 <= int(layer) < L:
                raise ValueError(f"neurons: layer {layer} outside [0, {L})")
            if idx.dim() != 1 or idx.dtype != torch.long:
                raise ValueError(f"neurons[{layer}] must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
            if I and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= I):
                raise ValueError(f"neurons[{layer}] holds ids outside [0, {I})")
        return self

    # ------------------------------------------------------------------------------ I/O
    def to_meta(self) -> dict:
        m = dict(self.meta)
        m.update(format=FORMAT, version=VERSION, alpha=float(self.alpha), languages=list(self.languages),
                 has_gate=self.gate is not None,
                 shift="none" if self.shift is None else ("bank" if self.shift.dim() == 4 else "single"),
                 neuron_layers=sorted(int(k) for k in self.neurons))
        return m

    def save(self, path) -> Path:
        """Write <path>.safetensors + <path>.json (or plan.* inside a directory); returns the .safetensors."""
        from safetensors.torch import save_file
        self.validate()
        st, js = _paths(path)
        st.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        if self.gate is not None:
            tensors["gate"] = self.gate.detach().float().cpu().contiguous()
        if self.shift is not None:
            tensors["shift"] = self.shift.detach().float().cpu().contiguous()
        for layer, idx in self.neurons.items():
            tensors[f"neurons.{int(layer)}"] = idx.detach().long().cpu().contiguous()
        meta = self.to_meta()
        text = json.dumps(meta, indent=2, sort_keys=True)
        save_file(tensors, str(st), metadata={_META_KEY: text})
        js.write_text(text + "\n")
        return st

    @classmethod
    def load(cls, path, model=None) -> "SteeringPlan":
        """Read a plan; with `model` (Steerer or HF model) check it fits that model."""
        from safetensors import safe_open
        st, _ = _paths(path)
        if not st.exists():
            raise FileNotFoundError(f"no steering plan at {st}")
        with safe_open(str(st), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            if raw is None:
                raise ValueError(f"{st} is not an xlkernels steering plan (no '{_META_KEY}' metadata)")
            meta = json.loads(raw)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
            raise ValueError(f"{st}: unsupported plan format {meta.get('format')!r} v{meta.get('version')}")
        neurons = {int(k.split(".", 1)[1]): v.long() for k, v in tensors.items() if k.startswith("neurons.")}
        keep = {k: meta[k] for k in meta if k not in ("format", "version", "alpha", "languages", "has_gate",
                                                      "shift", "neuron_layers")}
        plan = cls(gate=tensors.get("gate"), shift=tensors.get("shift"), alpha=float(meta.get("alpha", 1.0)),
                   neurons=neurons, languages=list(meta.get("languages", [])), meta=keep)
        plan.validate(model_dims(model) if model is not None else None)
        return plan

    # ------------------------------------------------------------------------------ use
    def apply(self, steerer, target=None, alpha: float | None = None, batch_size: int = 1):
        """Set the steerer's gate, shift and neuron deactivations from the plan.

        For a bank, `target` names the language row: one name (used for every sample, batch_size rows)
        or a list with one name per sample. alpha overrides the plan's."""
        self.validate(model_dims(steerer))
        a = self.alpha if alpha is None else float(alpha)
        dev = steerer.gate.device
        if self.gate is not None:
            steerer.gate = self.gate.to(dev, torch.float32)
        if self.shift is not None:
            if self.shift.dim() == 4:
                if target is None:
                    raise ValueError(f"target must name a language of the plan's bank {self.languages}")
                names = [target] * batch_size if isinstance(target, str) else list(target)
                bad = [x for x in names if x not in self.languages]
                if bad:
                    raise ValueError(f"target {bad} is not in the plan's languages {self.languages}")
                steerer.set_shift_bank(self.shift.to(dev, torch.float32), alpha=a)
                steerer.select_languages(torch.as_tensor([self.languages.index(x) for x in names],
                                                         dtype=torch.long, device=dev))
            else:
                steerer.shift = (a * self.shift).to(dev, torch.float32)
        if self.neurons:
            steerer.deactivate_neurons({int(k): v.to(dev) for k, v in self.neurons.items()})
        return steerer


def _shape(name, t, want):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(want) or any(w not in (None, 0) and w != s for w, s in zip(want, t.shape)):
        ws = "(" + ", ".join("*" if w in (None, 0) else str(w) for w in want) + ")"
        raise ValueError(f"{name} must have shape {ws}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")


def _paths(path):
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    if p.is_dir() or not p.suffix:
        return p / "plan.safetensors", p / "plan.json"
    raise ValueError(f"path must be a directory or end in .safetensors/.json, got {p}")
