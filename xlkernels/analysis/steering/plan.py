"""A saved steering plan: head gates, head shifts (one vector or a language bank), neuron deactivations.

On disk: `<name>.safetensors` (tensors, plus the metadata JSON under the key "xlkernels_plan") and a
`<name>.json` copy of the metadata for people. No pickle. `save(path)` with a directory writes
`plan.safetensors` + `plan.json` inside it. `load(path, model=...)` checks every shape and neuron index
against the model (a Steerer or an HF model) and raises ValueError naming the field.

Tensors: "gate" (L,H); "shift" (L,H,D) or (K,L,H,D) with one row per name in `languages`;
"neurons.<layer>" (n,) int64 for each deactivated layer.
Residual-stream steering (optional): "itlc.<name>" (the fitted ITLC state, see analysis/itlc.py) with its
settings under the metadata key "itlc" (langs, layer, accuracy, threshold, alpha); "incline.W" (L,E,E) with
"incline" (site, src, sigma). E = the model's hidden size (metadata "hidden_size").
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "xlkernels-steering-plan"
VERSION = 2   # 2: itlc / incline sections (written only when present; else 1)
_META_KEY = "xlkernels_plan"


def model_dims(model) -> dict:
    """{"num_layers","num_heads","head_dim","num_neurons"} of a Steerer or an HF model/config."""
    if all(hasattr(model, a) for a in ("num_layers", "num_heads", "head_dim")):
        cfg = getattr(model, "config", None)
        return {"num_layers": int(model.num_layers), "num_heads": int(model.num_heads),
                "head_dim": int(model.head_dim), "num_neurons": int(getattr(model, "num_neurons", 0) or 0),
                "hidden_size": int(getattr(cfg, "hidden_size", 0) or 0)}
    cfg = getattr(model, "config", model)
    cfg = getattr(cfg, "text_config", None) or cfg
    H = int(cfg.num_attention_heads)
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    return {"num_layers": int(cfg.num_hidden_layers), "num_heads": H, "head_dim": int(D),
            "num_neurons": int(getattr(cfg, "intermediate_size", 0) or 0), "hidden_size": int(cfg.hidden_size)}


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
    itlc: object = None                       # analysis.itlc.ITLC: residual shift toward a language
    itlc_alpha: float = 0.5
    incline: object = None                    # analysis.incline.INCLINE: W (L,E,E) from incline.src to English
    sigma: float = 0.3

    # ------------------------------------------------------------------------------ checks
    def dims(self) -> dict:
        return {k: self.meta.get(k) for k in ("num_layers", "num_heads", "head_dim", "num_neurons", "hidden_size")}

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
        E = d.get("hidden_size")
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
        if self.itlc is not None:
            it = self.itlc
            if L and not 1 <= it.layer <= L - 1:
                raise ValueError(f"itlc.layer must be in [1, {L - 1}] for a {L}-layer model, got {it.layer}")
            K, n = len(it.langs), it.scalings.shape[-1] if it.scalings.dim() == 2 else None
            for name, want in (("mean", (E,)), ("std", (E,)), ("xbar", (E,)), ("scalings", (E, None)),
                               ("probe_weight", (K, n)), ("probe_bias", (K,)), ("vectors", (K, n))):
                _shape(f"itlc.{name}", getattr(it, name), want)
            if tuple(it.active.shape) != (K, n):
                raise ValueError(f"itlc.active must have shape ({K}, {n}), got {tuple(it.active.shape)}")
        if self.incline is not None:
            _shape("incline.W", self.incline.W, (L, E, E))
        return self

    # ------------------------------------------------------------------------------ I/O
    def to_meta(self) -> dict:
        m = dict(self.meta)
        latent = self.itlc is not None or self.incline is not None
        m.update(format=FORMAT, version=VERSION if latent else 1, alpha=float(self.alpha),
                 languages=list(self.languages),
                 has_gate=self.gate is not None,
                 shift="none" if self.shift is None else ("bank" if self.shift.dim() == 4 else "single"),
                 neuron_layers=sorted(int(k) for k in self.neurons))
        if self.itlc is not None:
            it = self.itlc
            acc = None if it.accuracy != it.accuracy else it.accuracy   # NaN (no held-out split) -> null
            m["itlc"] = {"langs": list(it.langs), "layer": it.layer, "accuracy": acc,
                         "threshold": it.threshold, "alpha": float(self.itlc_alpha)}
        if self.incline is not None:
            m["incline"] = {"site": self.incline.site, "src": self.incline.src, "sigma": float(self.sigma)}
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
        if self.itlc is not None:
            for k in self.itlc._TENSORS:
                t = getattr(self.itlc, k).detach().cpu()
                tensors[f"itlc.{k}"] = (t.to(torch.uint8) if k == "active" else t).contiguous()
        if self.incline is not None:
            tensors["incline.W"] = self.incline.W.detach().float().cpu().contiguous()
        meta = self.to_meta()
        text = json.dumps(meta, indent=2, sort_keys=True)
        save_file(tensors, str(st), metadata={_META_KEY: text})
        js.write_text(text + "\n")
        return st

    @classmethod
    def load(cls, path, model=None) -> "SteeringPlan":
        """Read a plan; with `model` (Steerer or HF model) check it fits that model. A missing, corrupt or
        foreign file raises xlkernels.files.FileError naming it; a plan for another model, ValueError."""
        from xlkernels.files import FileError, MissingFileError, json_field, read_safetensors
        try:
            st, _ = _paths(path)
        except ValueError:
            raise FileError(path, "not a steering plan: expected a directory or a .safetensors/.json file") from None
        if not st.exists():
            if not Path(path).exists():
                raise MissingFileError(path, "no such file or directory")
            if Path(path).is_dir():
                raise MissingFileError(st, "no such file: no steering plan in this directory")
            raise FileError(path, f"not a steering plan: its tensors {st.name} are not beside it")
        raw, tensors = read_safetensors(st)
        if _META_KEY not in raw:
            raise FileError(st, f"not an xlkernels steering plan (no '{_META_KEY}' metadata; "
                                f"tensors {sorted(tensors)[:4]})")
        meta = json_field(st, raw, _META_KEY)
        try:
            plan = cls._from_file(meta, tensors, st)
            plan.validate()
        except FileError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
            raise FileError(st, f"malformed steering plan ({str(e).removeprefix(f'{st}: ')})") from None
        if model is not None:
            try:
                plan.validate(model_dims(model))
            except ValueError as e:
                raise ValueError(f"{st}: {e}") from None
        return plan

    @classmethod
    def _from_file(cls, meta, tensors, st):
        from xlkernels.files import FileError
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise FileError(st, f"unsupported plan format {got!r}")
        neurons = {int(k.split(".", 1)[1]): v.long() for k, v in tensors.items() if k.startswith("neurons.")}
        keep = {k: meta[k] for k in meta if k not in ("format", "version", "alpha", "languages", "has_gate",
                                                      "shift", "neuron_layers", "itlc", "incline")}
        plan = cls(gate=tensors.get("gate"), shift=tensors.get("shift"), alpha=float(meta.get("alpha", 1.0)),
                   neurons=neurons, languages=list(meta.get("languages", [])), meta=keep)
        if "itlc" in meta:
            plan.itlc, plan.itlc_alpha = _load_itlc(meta["itlc"], tensors, st), float(meta["itlc"].get("alpha", 0.5))
        if "incline" in meta:
            from .incline import INCLINE
            m = meta["incline"]
            if "incline.W" not in tensors:
                raise ValueError(f"{st}: the metadata names an incline section but the tensor incline.W is missing")
            plan.incline = INCLINE(tensors["incline.W"], m.get("site", "block"), m.get("src"))
            plan.sigma = float(m.get("sigma", 0.3))
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

    def inject(self, model, batch=None, target=None, source=None, alpha=None, sigma=None,
               strategy="prompt_and_gen"):
        """Context manager for the plan's residual-stream steering on an HF model (no-op without it).

        ITLC: add itlc_alpha * (u_target - u_source) after block itlc.layer-1 (source None: u_target only).
        INCLINE: clean pass on `batch` (input_ids, attention_mask), then overwrite every layer at the last
        prompt token at prefill with h + sigma * h W_l. alpha / sigma override the plan's."""
        if self.itlc is not None and target is None:
            raise ValueError(f"target must name a language of the plan's ITLC fit {self.itlc.langs}")
        if self.incline is not None and batch is None:
            raise ValueError("batch (the prompt's input_ids, attention_mask) is needed for INCLINE")
        stack = contextlib.ExitStack()
        try:   # INCLINE first: its clean pass must not see the ITLC shift
            if self.incline is not None:
                s = self.sigma if sigma is None else float(sigma)
                stack.enter_context(self.incline.inject(model, batch, s))
            if self.itlc is not None:
                a = self.itlc_alpha if alpha is None else float(alpha)
                stack.enter_context(self.itlc.inject(model, target, source, alpha=a, strategy=strategy))
        except BaseException:
            stack.close()
            raise
        return stack


def _load_itlc(m, tensors, st):
    from .itlc import ITLC
    missing = [k for k in ITLC._TENSORS if f"itlc.{k}" not in tensors]
    if missing:
        raise ValueError(f"{st}: the itlc section lacks the tensors {['itlc.' + k for k in missing]}")
    t = {k: tensors[f"itlc.{k}"] for k in ITLC._TENSORS}
    t["active"] = t["active"].bool()
    try:
        acc = m.get("accuracy")
        return ITLC(list(m["langs"]), int(m["layer"]), accuracy=float("nan") if acc is None else float(acc),
                    threshold=float(m.get("threshold", 0.01)), **t)
    except RuntimeError as e:   # pinv / matmul of mismatched shapes
        raise ValueError(f"{st}: itlc tensors do not fit together: {e}") from None


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
