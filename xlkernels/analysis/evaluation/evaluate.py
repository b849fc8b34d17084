"""Does a steering plan do what it claims, and at what cost? The evaluation harness behind `xlkernels eval`.

`evaluate(model, tokenizer, plans, prompts, source=..., target=...)` generates (greedy, batched, left-padded)
from the prompts with no steering and with every plan at every strength, and measures per (plan, strength):
- target_rate / source_rate / unknown_rate: fractions of generations that analysis.langid identifies as the
  target language, the source language, or cannot identify ("unknown"; the rest is another language);
- nll: fluency, the mean NLL of the generated tokens under the UNSTEERED model (chunked lm_head, no full
  logits: tokens.token_nll), token-weighted over all generations; nll_delta = nll - the unsteered row's;
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
new_tokens, seconds, languages {code: count}, generations [texts]. `best(result)` picks each plan's best row.
Beside this module, and importable from it: generation.py (batched generation, the NLL and repetition measures),
forcing.py (NeuronForcing, load_plan), fit.py (fit_plans: one plan per method), eval_report.py (`to_markdown`,
`plot`, `save`: the table, the success-vs-fluency plot and eval.json/.md/.png).
"""
from __future__ import annotations

import contextlib
import math

import torch

from . import langid
from ..neurons.forcing import NeuronForcing, load_plan  # noqa: F401 (this module's API)
from .fit import FIT_METHODS, fit_plans  # noqa: F401
from .generation import generate, generated_nll, repetition_rate, steerer_of  # noqa: F401
from .report import STRENGTH_NAME, plot, save, to_markdown  # noqa: F401

METHODS = ("shift", "itlc", "incline", "forcing", "gate", "neurons")
DEFAULT_STRENGTHS = {"shift": (1.0, 2.0, 4.0, 8.0, 16.0), "itlc": (0.5, 1.0, 2.0, 4.0, 8.0),
                     "incline": (0.1, 0.3, 0.6, 1.0, 2.0), "forcing": (0.5, 1.0, 2.0, 4.0, 8.0),
                     "gate": (0.5, 1.0, 2.0, 4.0), "neurons": (None,)}


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


# ---------------------------------------------------------------------------------------------- steering
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


def language_counts(texts, lid_langs=None) -> dict:
    """{label: count} of generations by langid.label: a degenerate output (too few distinct words, a loop) is
    counted as "degenerate", never as a language."""
    counts = {}
    for c in langid.label(texts, langs=lid_langs):
        counts[c] = counts.get(c, 0) + 1
    return counts


def evaluate(model, tokenizer, plans: dict, prompts, *, source: str, target: str, strengths=None,
             max_new_tokens: int = 24, batch_size: int = 16, lid_langs=None, baseline: bool = True,
             steer_tokens: str = "all", progress: bool = False) -> dict:
    """Evaluate steering plans on prompts; see the module docstring for the measures and the result.

    model: an HF causal LM (patched here if needed) or its Steerer. plans: {name: SteeringPlan or
    NeuronForcing}. prompts: held-out prompts in the source language. source / target: language codes
    (corpus spelling: "en", "zh_Hans"). strengths: None, a list, or {plan name or method: list}.
    lid_langs: candidate languages for the identifier (None = all 97 it knows). steer_tokens: "all",
    "prompt" or "generated": where head/neuron steering acts (see steered())."""
    steerer, hf = steerer_of(model)
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
            from ..steering.plan import model_dims
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
        from ..tokens import _progress
        it = _progress(work, True, total=len(work), desc="eval")
    steerer.reset()
    for name, plan, m, s in it:
        steer = None if plan is None else (lambda b, p=plan, s=s: steered(steerer, p, s, b, source, target, steer_tokens))
        gen, secs = generate(hf, tokenizer, prompts, max_new_tokens, batch_size, steer)
        with steerer.unsteered():
            nll_sum, n_tok = generated_nll(hf, tokenizer, prompts, gen, batch_size)
        texts = [tokenizer.decode(g, skip_special_tokens=True) for g in gen]
        counts = language_counts(texts, lid_langs)
        n = len(texts)
        new = sum(len(g) for g in gen)
        rows.append({"plan": name, "method": m, "strength": s,
                     "target_rate": counts.get(lid_tgt, 0) / n, "source_rate": counts.get(lid_src, 0) / n,
                     "unknown_rate": counts.get(langid.UNKNOWN, 0) / n,
                     "degenerate_rate": counts.get(langid.DEGENERATE, 0) / n,
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


def evaluate_held_out(model, tokenizer, plans: dict, dev_prompts, test_prompts, *, source: str, target: str,
                      strengths=None, max_nll_delta: float = 1.0, **kw) -> dict:
    """Each plan's strength chosen on dev prompts, reported on test prompts.

    Sweeps `strengths` on dev_prompts, keeps each plan's best row (best(): highest target rate, then lower
    NLL) among those with nll_delta <= max_nll_delta (a plan with none keeps its best row regardless and is
    marked), and evaluates that strength alone on test_prompts. Returns the test result (evaluate()) with
    "dev": the dev rows without generations, "chosen": {plan: {"strength", "within_cost"}} and
    "max_nll_delta". kw: evaluate()'s other arguments."""
    if not dev_prompts or not test_prompts:
        raise ValueError("dev_prompts and test_prompts must both be non-empty")
    if set(map(str, dev_prompts)) & set(map(str, test_prompts)):
        raise ValueError("dev_prompts and test_prompts overlap: the strength would be chosen on test prompts")
    dev = evaluate(model, tokenizer, plans, dev_prompts, source=source, target=target, strengths=strengths, **kw)
    ok, anyrow = best(dev, max_nll_delta), best(dev)
    chosen = {name: {"strength": (ok.get(name) or anyrow[name])["strength"], "within_cost": name in ok}
              for name in plans}
    test = evaluate(model, tokenizer, plans, test_prompts, source=source, target=target,
                    strengths={name: [c["strength"]] if c["strength"] is not None else [0.0]
                               for name, c in chosen.items()}, **kw)
    test["dev"] = [{k: v for k, v in r.items() if k != "generations"} for r in dev["rows"]]
    test.update(chosen=chosen, max_nll_delta=max_nll_delta, dev_prompts=list(dev_prompts))
    return test
