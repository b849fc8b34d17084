"""Does a steering plan do what it claims, and at what cost? The evaluation harness behind `xlkernels eval`.

`evaluate(model, tokenizer, plans, prompts, source=..., target=...)` generates (greedy, batched, left-padded)
from the prompts with no steering and with every plan at every strength, and measures per (plan, strength):
- target_rate / source_rate / unknown_rate: fractions of generations that analysis.langid identifies as the
  target language, the source language, or cannot identify ("unknown"; the rest is another language);
- nll: fluency, the mean NLL of the generated tokens under the UNSTEERED model (chunked lm_head, no full
  logits: heads.token_nll), token-weighted over all generations; nll_delta = nll - the unsteered row's;
- repetition: the mean over generations (>= 3 tokens) of the fraction of token 3-grams that already occurred
  earlier in the same generation (0 = none repeats; a loop of one token gives ~1);
- tokens_per_s: generated tokens / seconds spent generating (steering set-up and INCLINE's clean pass included).
Generation stops at an EOS token; the tokens after it do not count.

Plans ({name: plan}): a SteeringPlan (analysis/plan.py) or a NeuronForcing (below). The strength means, by
the plan's method (method_of): "shift" (CLAIM bank or one shift vector): alpha; "itlc": alpha; "incline":
sigma; "gate" (LAHIS head sets, soft mask): the gate scale s, gate = max(0, 1 + s * (plan.gate - 1)) (s = 1 is
the plan, 0 no steering); "forcing" (LAPE neurons): the scale of the set values; "neurons" (deactivation
only): none. A plan with several parts takes the strength for its method (the first of METHODS it has); its
other parts keep the plan's settings. strengths: None (each plan's own setting), a list for every plan, or
{name: list}. DEFAULT_STRENGTHS holds a sweep per method.

Result: {"source","target","prompts","max_new_tokens","lid_langs","rows": [row...]}, the first row the
unsteered model (plan "unsteered", method "none"); each row: plan, method, strength, the measures above,
new_tokens, seconds, languages {code: count}, generations [texts]. `best(result)` picks each plan's best row;
`to_markdown`, `plot`, `save` write the table, the success-vs-fluency plot and eval.json/.md/.png.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import langid
from .heads import pad_id_of, token_nll

METHODS = ("shift", "itlc", "incline", "forcing", "gate", "neurons")
DEFAULT_STRENGTHS = {"shift": (1.0, 2.0, 4.0, 8.0, 16.0), "itlc": (0.5, 1.0, 2.0, 4.0, 8.0),
                     "incline": (0.1, 0.3, 0.6, 1.0, 2.0), "forcing": (0.5, 1.0, 2.0, 4.0, 8.0),
                     "gate": (0.5, 1.0, 2.0, 4.0), "neurons": (None,)}
STRENGTH_NAME = {"shift": "alpha", "itlc": "alpha", "incline": "sigma", "forcing": "set-value scale",
                 "gate": "gate scale", "neurons": "-", "none": "-"}


# ---------------------------------------------------------------------------------------------- LAPE forcing
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
        from safetensors import safe_open
        p = Path(path)
        p = p / "forcing.safetensors" if p.is_dir() else p
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("xlkernels_forcing")
            if raw is None:
                raise ValueError(f"{p} is not an xlkernels neuron forcing plan")
            t = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(raw)
        part = lambda pre: {int(k.split(".", 1)[1]): v for k, v in t.items() if k.startswith(pre + ".")}  # noqa: E731
        return cls(part("off"), part("on"), part("values"), float(meta.pop("scale", 1.0)), meta)


def load_plan(path, model=None):
    """A SteeringPlan or a NeuronForcing from disk (whichever the file holds)."""
    from .plan import SteeringPlan
    p = Path(path)
    if (p.is_dir() and (p / "forcing.safetensors").exists()) or p.name.endswith("forcing.safetensors"):
        return NeuronForcing.load(p)
    return SteeringPlan.load(p, model=model)


def method_of(plan) -> str:
    """The method whose strength a plan's sweep varies (see the module doc)."""
    if isinstance(plan, NeuronForcing):
        if not any(len(v) for v in list(plan.off.values()) + list(plan.on.values())):
            raise ValueError("the neuron forcing plan is empty: no neuron to switch off or set")
        return "forcing"
    have = {"shift": plan.shift is not None, "itlc": plan.itlc is not None, "incline": plan.incline is not None,
            "gate": plan.gate is not None and bool((plan.gate != 1).any()),
            "neurons": any(len(v) for v in plan.neurons.values()), "forcing": False}
    for m in METHODS:
        if have[m]:
            return m
    raise ValueError("the plan is empty: no gate other than 1, shift, neurons, ITLC or INCLINE")


# ---------------------------------------------------------------------------------------------- measures
def repetition_rate(seqs, n: int = 3) -> float:
    """Mean over sequences with >= n tokens of the fraction of n-grams seen earlier in the same sequence."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    vals = []
    for s in seqs:
        s = list(s)
        grams = [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
        if grams:
            vals.append(1.0 - len(set(grams)) / len(grams))
    return sum(vals) / len(vals) if vals else 0.0


def _eos_ids(model, tok) -> set:
    ids = set()
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tok.eos_token_id):
        if v is not None:
            ids.update(v if isinstance(v, (list, tuple)) else [v])
    return {int(i) for i in ids}


def _cut(row, eos) -> list:
    out = []
    for t in row:
        if t in eos:
            break
        out.append(t)
    return out


@contextlib.contextmanager
def _left_padding(tok):
    side = getattr(tok, "padding_side", "right")
    tok.padding_side = "left"
    try:
        yield
    finally:
        tok.padding_side = side


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens: int, batch_size: int = 16, steer=None, **gen_kw):
    """Greedy batched generation: (generated ids per prompt, cut at EOS; seconds). steer(batch) -> context
    manager active while a batch generates (its set-up time counts) that may yield extra generate()
    keyword arguments, or None."""
    eos, pad = _eos_ids(model, tok), pad_id_of(tok)
    dev = _device(model)
    outs, secs = [], 0.0
    for s in range(0, len(prompts), batch_size):
        with _left_padding(tok):
            enc = tok(list(prompts[s:s + batch_size]), return_tensors="pt", padding=True)
        batch = {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev)}
        t0 = time.perf_counter()
        with (steer(batch) if steer else contextlib.nullcontext()) as extra:
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=pad, temperature=None, top_p=None, top_k=None,
                                 **gen_kw, **(extra or {}))
        secs += time.perf_counter() - t0
        T = batch["input_ids"].shape[1]
        outs += [_cut(r, eos) for r in out[:, T:].tolist()]
    return outs, secs


@torch.no_grad()
def generated_nll(model, tok, prompts, generated, batch_size: int = 16):
    """(summed NLL, token count) of the generated tokens after their prompts under the model as it is now."""
    pad = pad_id_of(tok)
    dev = _device(model)
    seqs = []
    for p, g in zip(prompts, generated):
        ids = tok(p)["input_ids"]
        seqs.append((list(ids), list(g)))
    total, count = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))  # less padding
    for s in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[s:s + batch_size] if seqs[i][1]]
        if not chunk:
            continue
        T = max(len(a) + len(b) for a, b in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (a, b) in enumerate(chunk):
            n = len(a) + len(b)
            ids[r, :n] = torch.as_tensor(a + b)
            mask[r, :n] = 1
            labels[r, len(a):n] = torch.as_tensor(b)
        nll, valid = token_nll(model, ids.to(dev), mask.to(dev), labels.to(dev))
        total += float(nll[valid].double().sum())
        count += int(valid.sum())
    return total, count


# ---------------------------------------------------------------------------------------------- steering
def _steerer_of(model):
    import xlkernels
    if all(hasattr(model, a) for a in ("model", "num_layers", "reset")):
        return model, model.model
    return xlkernels.patch(model), model


STEER_TOKENS = ("all", "prompt", "generated")


class _AfterPrefill:
    """Logits processor that runs `fn` once, after the prefill forward (before the first decode step)."""

    def __init__(self, fn):
        self.fn, self.done = fn, False

    def __call__(self, input_ids, scores):
        if not self.done:
            self.done = True
            self.fn()
        return scores


def _apply(steerer, plan, strength, target, B):
    if isinstance(plan, NeuronForcing):
        plan.apply(steerer, strength)
        return
    m = method_of(plan)
    bank = plan.shift is not None and plan.shift.dim() == 4
    plan.apply(steerer, target=target if bank else None, batch_size=B, alpha=strength if m == "shift" else None)
    if m == "gate" and strength is not None:
        g = plan.gate.to(steerer.gate.device, torch.float32)
        steerer.gate = (1.0 + float(strength) * (g - 1.0)).clamp_min(0.0)


@contextlib.contextmanager
def steered(steerer, plan, strength, batch, source, target, steer_tokens: str = "all"):
    """The plan at `strength` on the steerer (and its residual hooks on the model) for one batch. Yields
    the generate() keyword arguments it needs (a logits processor when steer_tokens is not "all":
    "prompt" = head/neuron steering in the prefill only, "generated" = in the decode steps only; ITLC and
    INCLINE keep their own token strategy)."""
    if steer_tokens not in STEER_TOKENS:
        raise ValueError(f"steer_tokens must be one of {STEER_TOKENS}, got {steer_tokens!r}")
    model = steerer.model
    B = batch["input_ids"].shape[0]
    steerer.reset()
    stack = contextlib.ExitStack()
    kw = {}
    try:
        if steer_tokens != "generated":
            _apply(steerer, plan, strength, target, B)
        if steer_tokens == "prompt":
            kw["logits_processor"] = [_AfterPrefill(steerer.reset)]
        elif steer_tokens == "generated":
            kw["logits_processor"] = [_AfterPrefill(lambda: _apply(steerer, plan, strength, target, B))]
        if not isinstance(plan, NeuronForcing) and (plan.itlc is not None or plan.incline is not None):
            m = method_of(plan)
            src = source if plan.itlc is not None and source in plan.itlc.langs else None
            stack.enter_context(plan.inject(model, batch, target=target, source=src,
                                            alpha=strength if m == "itlc" else None,
                                            sigma=strength if m == "incline" else None))
        yield kw
    finally:
        stack.close()
        steerer.reset()


def _own_strength(plan, m):
    if isinstance(plan, NeuronForcing):
        return plan.scale
    return {"shift": plan.alpha, "itlc": plan.itlc_alpha, "incline": plan.sigma, "gate": 1.0}.get(m)


def _strength_list(strengths, name, plan, m):
    if strengths is None:
        return [_own_strength(plan, m)]
    if isinstance(strengths, dict):
        s = strengths.get(name, strengths.get(m))
        if s is None:
            return [_own_strength(plan, m)]
    else:
        s = strengths
    s = [s] if isinstance(s, (int, float)) else list(s)
    if not s:
        raise ValueError(f"strengths for plan {name!r} is empty")
    if m == "neurons":
        return [None]
    for v in s:
        if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"strengths for plan {name!r} must be finite numbers, got {v!r}")
    return [float(v) for v in s]


def evaluate(model, tokenizer, plans: dict, prompts, *, source: str, target: str, strengths=None,
             max_new_tokens: int = 24, batch_size: int = 16, lid_langs=None, baseline: bool = True,
             steer_tokens: str = "all", progress: bool = False) -> dict:
    """Evaluate steering plans on prompts; see the module docstring for the measures and the result.

    model: an HF causal LM (patched here if needed) or its Steerer. plans: {name: SteeringPlan or
    NeuronForcing}. prompts: held-out prompts in the source language. source / target: language codes
    (corpus spelling: "en", "zh_Hans"). strengths: None, a list, or {plan name or method: list}.
    lid_langs: candidate languages for the identifier (None = all 97 it knows). steer_tokens: "all",
    "prompt" or "generated": where head/neuron steering acts (see steered())."""
    steerer, hf = _steerer_of(model)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if not isinstance(plans, dict) or any(not isinstance(k, str) for k in plans):
        raise TypeError("plans must be a dict {name: SteeringPlan or NeuronForcing}")
    if "unsteered" in plans:
        raise ValueError("plans: the name 'unsteered' is reserved for the baseline row")
    if not plans and not baseline:
        raise ValueError("nothing to evaluate: no plans and baseline=False")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    for name, x in (("source", source), ("target", target)):
        langid.iso(x)
        if lid_langs is not None and x not in lid_langs:
            raise ValueError(f"{name} {x!r} must be one of lid_langs {list(lid_langs)}")
    if source == target:
        raise ValueError(f"source and target must differ, got {source!r} for both")
    if steer_tokens not in STEER_TOKENS:
        raise ValueError(f"steer_tokens must be one of {STEER_TOKENS}, got {steer_tokens!r}")
    work = []
    for name, plan in plans.items():
        m = method_of(plan)
        if isinstance(plan, NeuronForcing):
            plan.validate(steerer.num_layers, steerer.num_neurons)
        else:
            from .plan import model_dims
            plan.validate(model_dims(steerer))
            if plan.shift is not None and plan.shift.dim() == 4 and target not in plan.languages:
                raise ValueError(f"plan {name!r}: target {target!r} is not in its shift bank {plan.languages}")
            if plan.itlc is not None and target not in plan.itlc.langs:
                raise ValueError(f"plan {name!r}: target {target!r} is not in its ITLC languages {plan.itlc.langs}")
        work += [(name, plan, m, s) for s in _strength_list(strengths, name, plan, m)]
    if baseline:
        work.insert(0, ("unsteered", None, "none", None))
    lid_src, lid_tgt = (source, target) if lid_langs is not None else (langid.iso(source), langid.iso(target))
    rows = []
    it = work
    if progress:
        from .heads import _progress
        it = _progress(work, True, total=len(work), desc="eval")
    steerer.reset()
    for name, plan, m, s in it:
        steer = None if plan is None else (lambda b, p=plan, s=s: steered(steerer, p, s, b, source, target, steer_tokens))
        gen, secs = generate(hf, tokenizer, prompts, max_new_tokens, batch_size, steer)
        with steerer.unsteered():
            nll_sum, n_tok = generated_nll(hf, tokenizer, prompts, gen, batch_size)
        texts = [tokenizer.decode(g, skip_special_tokens=True) for g in gen]
        codes = langid.detect(texts, langs=lid_langs)
        counts = {}
        for c in codes:
            counts[c] = counts.get(c, 0) + 1
        n = len(codes)
        new = sum(len(g) for g in gen)
        rows.append({"plan": name, "method": m, "strength": s,
                     "target_rate": counts.get(lid_tgt, 0) / n, "source_rate": counts.get(lid_src, 0) / n,
                     "unknown_rate": counts.get(langid.UNKNOWN, 0) / n,
                     "nll": nll_sum / n_tok if n_tok else float("nan"),
                     "repetition": repetition_rate(gen), "tokens_per_s": new / secs if secs > 0 else float("nan"),
                     "new_tokens": new, "seconds": secs, "languages": dict(sorted(counts.items())),
                     "generations": texts})
    base = next((r["nll"] for r in rows if r["plan"] == "unsteered"), None)
    for r in rows:
        r["nll_delta"] = None if base is None else r["nll"] - base
    return {"source": source, "target": target, "prompts": prompts, "max_new_tokens": max_new_tokens,
            "lid_langs": None if lid_langs is None else list(lid_langs), "steer_tokens": steer_tokens,
            "rows": rows}


# ---------------------------------------------------------------------------------------------- reporting
def best(result: dict, max_nll_delta: float | None = None) -> dict:
    """{plan: row} with each plan's highest target rate (ties: lower nll), among rows whose nll_delta is
    <= max_nll_delta when given (a plan with no such row is left out). The baseline row is not a plan."""
    out = {}
    for r in result["rows"]:
        if r["plan"] == "unsteered":
            continue
        if max_nll_delta is not None and (r["nll_delta"] is None or not r["nll_delta"] <= max_nll_delta):
            continue
        cur = out.get(r["plan"])
        if cur is None or (r["target_rate"], -r["nll"]) > (cur["target_rate"], -cur["nll"]):
            out[r["plan"]] = r
    return out


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def to_markdown(result: dict) -> str:
    """The result as a Markdown table (one line per plan and strength, the unsteered model first)."""
    src, tgt = result["source"], result["target"]
    lines = [f"| plan | method | strength | {tgt} % | {src} % | unknown % | NLL (Δ) | rep-3 | tok/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        st = "-" if r["strength"] is None else f"{STRENGTH_NAME[r['method']]} {r['strength']:g}"
        d = r.get("nll_delta")
        nll = _fmt(r["nll"], ".2f") + ("" if d is None or r["plan"] == "unsteered" else f" ({d:+.2f})")
        lines.append(f"| {r['plan']} | {r['method']} | {st} | {100 * r['target_rate']:.0f} | "
                     f"{100 * r['source_rate']:.0f} | {100 * r['unknown_rate']:.0f} | {nll} | "
                     f"{r['repetition']:.2f} | {_fmt(r['tokens_per_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path, title=None):
    """Success (target rate) against fluency cost (NLL under the unsteered model): one curve per plan,
    points in strength order and labelled with the strength; the unsteered model as a star."""
    from .plots import _legend_right, _plt, _save
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = []
    for r in result["rows"]:
        if r["plan"] not in names:
            names.append(r["plan"])
    for name in names:
        rows = [r for r in result["rows"] if r["plan"] == name]
        if name == "unsteered":
            ax.scatter([rows[0]["nll"]], [100 * rows[0]["target_rate"]], marker="*", s=160, color="black",
                       label="unsteered", zorder=3)
            continue
        rows.sort(key=lambda r: -math.inf if r["strength"] is None else r["strength"])
        xs, ys = [r["nll"] for r in rows], [100 * r["target_rate"] for r in rows]
        line, = ax.plot(xs, ys, marker="o", label=f"{name} ({STRENGTH_NAME[rows[0]['method']]})")
        for r, x, y in zip(rows, xs, ys):
            if r["strength"] is not None:
                ax.annotate(f"{r['strength']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=line.get_color())
    ax.set_xlabel("fluency cost: NLL of the generated tokens under the unsteered model")
    ax.set_ylabel(f"generations identified as {result['target']} (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"steering {result['source']} -> {result['target']}: success vs fluency")
    _legend_right(ax, len(names))
    return _save(fig, path)


def save(result: dict, out, title=None) -> dict:
    """Write eval.json, eval.md and eval.png into directory `out`; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"eval.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    with open(paths["md"], "w") as f:
        f.write(to_markdown(result))
    plot(result, paths["png"], title)
    return paths


# ---------------------------------------------------------------------------------------------- fitting
FIT_METHODS = ("lape", "deactivate", "claim", "lahis", "itlc", "incline")


def fit_plans(model, tokenizer, corpus: dict, source: str, target: str, methods=FIT_METHODS, *,
              batch_size: int = 16, max_length: int = 48, claim: dict | None = None, lahis_texts: int = 12,
              layer: int | None = None, progress: bool = False) -> dict:
    """One plan per method, fitted on `corpus` ({lang: parallel texts}, holding source and target; more
    languages sharpen LAPE and the CLAIM probes), steering source -> target:
    - "lape": NeuronForcing: the source's LAPE neurons off, the target's set to their mean target activation;
    - "deactivate": SteeringPlan with the source's LAPE neurons off (no strength);
    - "claim": SteeringPlan with a CLAIM shift bank, pivot = source; `claim` = keyword arguments for
      shift.shift_bank plus "position" (default {"position": "last"}; select "importance" uses LAHIS scores);
    - "lahis": SteeringPlan gate: the target's language-specific LAHIS heads at 2, the source's at 0;
    - "itlc": SteeringPlan with ITLC language vectors at hidden_states[layer] (default L // 2), alpha 1;
    - "incline": SteeringPlan with INCLINE maps fitted from the source's to the target's representations
      (the paper maps a language to English), sigma 0.3.
    Use held-out prompts for evaluate(). Returns {method: plan} in `methods` order."""
    from . import heads as hd
    from . import neurons as N
    from . import shift as sh
    from .plan import SteeringPlan, model_meta
    bad = [m for m in methods if m not in FIT_METHODS]
    if bad:
        raise ValueError(f"methods {bad} are not among {FIT_METHODS}")
    for name, x in (("source", source), ("target", target)):
        if x not in corpus:
            raise ValueError(f"{name} {x!r} is not a language of the corpus {list(corpus)}")
    if source == target:
        raise ValueError(f"source and target must differ, got {source!r}")
    steerer, hf = _steerer_of(model)
    steerer.reset()
    meta = model_meta(steerer)
    langs = list(corpus)
    s, k = langs.index(source), langs.index(target)
    plans, scores = {}, None
    if {"lape", "deactivate"} & set(methods):
        stats = N.collect_stats(steerer, tokenizer, corpus, batch_size=batch_size, max_length=max_length,
                                progress=progress)
        res = N.lape(N.activation_probs(stats))
        mean = stats.mean()
        L = steerer.num_layers
        off = {l: res.neurons[s][l].long() for l in range(L) if len(res.neurons[s][l])}
        on = {l: res.neurons[k][l].long() for l in range(L) if len(res.neurons[k][l])}
        if "lape" in methods:
            plans["lape"] = NeuronForcing(off, on, {l: mean[l, k, i].float().cpu() for l, i in on.items()},
                                          meta=dict(meta, method="lape", source=source, target=target))
        if "deactivate" in methods:
            plans["deactivate"] = SteeringPlan(neurons=off, meta=dict(meta, method="lape-deactivate"))
    if "lahis" in methods or (claim or {}).get("select") == "importance":
        texts = {x: corpus[x][:lahis_texts] for x in (source, target)}
        scores = {x: hd.lahis_scores(steerer, tokenizer, t, batch_size=lahis_texts, max_length=32,
                                     progress=progress) for x, t in texts.items()}
    if "claim" in methods:
        kw = dict(claim or {})
        pos = kw.pop("position", "last")
        if kw.get("select") == "importance":
            kw.setdefault("importance", {x: scores.get(x, torch.zeros(steerer.num_layers, steerer.num_heads))
                                         for x in langs})
            for x in langs:
                if x not in kw["importance"]:
                    kw["importance"][x] = torch.zeros(steerer.num_layers, steerer.num_heads)
        kw.setdefault("pivot", source)
        outs = {x: sh.head_outputs(steerer, tokenizer, t, position=pos, batch_size=batch_size,
                                   max_length=max_length, progress=progress) for x, t in corpus.items()}
        bank = sh.shift_bank(outs, **kw)
        plans["claim"] = SteeringPlan(shift=bank.bank, alpha=4.0, languages=bank.languages,
                                      meta=dict(meta, method="claim", position=pos))
    if "lahis" in methods:
        sets = hd.head_sets(scores, min_rep=2)
        H = steerer.num_heads
        gate = torch.ones(steerer.num_layers, H)
        for i in sets["specific"][target]:
            gate[i // H, i % H] = 2.0
        for i in sets["specific"][source]:
            gate[i // H, i % H] = 0.0
        plans["lahis"] = SteeringPlan(gate=gate, meta=dict(meta, method="lahis-gate"))
    if "itlc" in methods:
        from .itlc import ITLC
        L = steerer.num_layers
        it = ITLC.fit(hf, tokenizer, corpus, layer=L // 2 if layer is None else layer, batch_size=batch_size,
                      max_length=max_length)
        plans["itlc"] = SteeringPlan(itlc=it, itlc_alpha=1.0, meta=dict(meta, method="itlc"))
    if "incline" in methods:
        from .incline import INCLINE
        inc = INCLINE.fit(hf, tokenizer, corpus[source], corpus[target], n=len(corpus[source]),
                          batch_size=batch_size, max_length=max_length, src=source)
        plans["incline"] = SteeringPlan(incline=inc, sigma=0.3, meta=dict(meta, method="incline"))
    steerer.reset()
    return {m: plans[m] for m in methods}
