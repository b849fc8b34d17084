"""LAPE-style neuron forcing as a plan of its own (NeuronForcing), and load_plan for either kind of plan file."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class NeuronForcing:
    """LAPE-style language switch on FFN neurons: `off` {layer: ids} set to 0, `on` {layer: ids} set to
    scale * values[layer] (e.g. the mean activation of the target language's neurons on target text)."""
    off: dict = field(default_factory=dict)
    on: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    scale: float = 1.0
    meta: dict = field(default_factory=dict)

    def validate(self, num_layers: int, num_neurons: int):
        for name, table in (("off", self.off), ("on", self.on)):
            for layer, idx in table.items():
                if not 0 <= int(layer) < num_layers:
                    raise ValueError(f"{name}: layer {layer} outside [0, {num_layers})")
                if idx.dim() != 1 or idx.dtype != torch.long:
                    raise ValueError(f"{name}[{layer}] must be a 1-D int64 tensor")
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_neurons):
                    raise ValueError(f"{name}[{layer}] holds neuron ids outside [0, {num_neurons})")
        for layer, idx in self.on.items():
            v = self.values.get(layer)
            if v is None or tuple(v.shape) != tuple(idx.shape):
                raise ValueError(f"values[{layer}] must have shape {tuple(idx.shape)} (one per 'on' neuron)")
        return self

    def apply(self, steerer, scale: float | None = None):
        """Set the interventions on the steerer (replacing any on these layers)."""
        from xlkernels import NeuronIntervention
        self.validate(steerer.num_layers, steerer.num_neurons)
        s = self.scale if scale is None else float(scale)
        I = steerer.num_neurons
        for layer in sorted(set(self.off) | set(self.on)):
            iv = NeuronIntervention.identity(I)
            if layer in self.off:
                iv = iv.then(NeuronIntervention.zero(self.off[layer], I))
            if layer in self.on:
                iv = iv.then(NeuronIntervention.set(self.on[layer], s * self.values[layer].float(), I))
            steerer.set_neuron_intervention(int(layer), iv)
        return steerer

    def save(self, path) -> Path:
        from safetensors.torch import save_file
        p = Path(path)
        p = p / "forcing.safetensors" if p.suffix != ".safetensors" else p
        p.parent.mkdir(parents=True, exist_ok=True)
        t = {f"off.{k}": v.long().contiguous() for k, v in self.off.items()}
        t.update({f"on.{k}": v.long().contiguous() for k, v in self.on.items()})
        t.update({f"values.{k}": v.float().contiguous() for k, v in self.values.items()})
        meta = dict(self.meta, scale=self.scale)
        save_file(t, str(p), metadata={"xlkernels_forcing": json.dumps(meta)})
        return p

    @classmethod
    def load(cls, path) -> "NeuronForcing":
        """Read a forcing plan (a directory holding forcing.safetensors, or the file); a missing, corrupt or
        foreign file raises xlkernels.files.FileError naming it."""
        from xlkernels.files import FileError, json_field, read_safetensors
        p = Path(path)
        p = p / "forcing.safetensors" if p.is_dir() else p
        raw, t = read_safetensors(p)
        if "xlkernels_forcing" not in raw:
            raise FileError(p, "not an xlkernels neuron forcing plan (no 'xlkernels_forcing' metadata)")
        meta = json_field(p, raw, "xlkernels_forcing")
        try:
            part = lambda pre: {int(k.split(".", 1)[1]): v for k, v in t.items() if k.startswith(pre + ".")}  # noqa: E731
            return cls(part("off"), part("on"), part("values"), float(meta.pop("scale", 1.0)), meta)
        except (ValueError, TypeError, AttributeError) as e:
            raise FileError(p, f"malformed neuron forcing plan ({e})") from None


def load_plan(path, model=None):
    """A SteeringPlan or a NeuronForcing from disk (whichever the file holds)."""
    from ..steering.plan import SteeringPlan
    p = Path(path)
    if (p.is_dir() and (p / "forcing.safetensors").exists()) or p.name.endswith("forcing.safetensors"):
        return NeuronForcing.load(p)
    return SteeringPlan.load(p, model=model)
