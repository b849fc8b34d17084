"""`xlkernels demo` (what `make demo` runs): the whole pipeline on the embedded Gemma-3-270M and the embedded
parallel corpus, on CPU: language heads (LAHIS), language neurons (LAPE + specific/related/general classes),
and a steered generation that moves an English prompt's continuation toward another language."""
import json
import os
import sys
import time
import traceback

import torch

from xlkernels.files import staged_dir

from ._common import add_model_arguments, add_out_argument, load_model_from_args

HELP = ("run the full pipeline on the embedded model: language heads, language neurons, steered generation "
        "(about 5-10 minutes on a laptop CPU, the first run included)")
EXAMPLES = """\
  xlkernels demo                      # embedded Gemma-3-270M, en/de/fr/es, writes ./xlk_demo
  xlkernels demo --quick              # fewer texts and languages (CI smoke test, ~2 min with the model cached)
  xlkernels demo --tiny llama --quick # random tiny model: checks the plumbing in seconds
  xlkernels demo --target fr --prompt "My favourite food is" --out runs/demo
  xlkernels demo --shift --alpha 2    # also try the per-head shift bank
"""

PROMPTS = ["The weather today is", "My favourite food is"]


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("--quick", action="store_true", help="fewer texts and languages (smoke test)")
    p.add_argument("--langs", default=None, help="comma-separated languages (default en,de,fr,es; quick: en,de,fr)")
    p.add_argument("--n", type=int, default=None, help="texts per language (default 96; quick: 32)")
    p.add_argument("--target", default="de", help="language to steer the English prompts toward (default de)")
    p.add_argument("--prompt", action="append", default=[], help="English prompt(s) to steer (repeatable)")
    p.add_argument("--shift", action="store_true", help="also steer with a per-head shift bank (CLAIM-style; "
                   "on Gemma-3-270M it does not switch the language, the neuron intervention does)")
    p.add_argument("--alpha", type=float, default=None, help="shift-bank strength for --shift (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per prompt (default 16)")
    add_out_argument(p, "xlk_demo")
    p.add_argument("--no-claims", action="store_true", help="skip step 4 (the papers' claims, `xlkernels reproduce`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


class Report:
    """Steps that may fail without stopping the demo; failures are printed with their traceback and make the
    exit code non-zero."""

    def __init__(self):
        self.failed, self.t0 = [], time.perf_counter()

    def step(self, title, fn, *a, **kw):
        print(f"\n== {title} " + "=" * max(0, 72 - len(title)), flush=True)
        t = time.perf_counter()
        try:
            out = fn(*a, **kw)
        except Exception as e:  # report, continue with the next step
            self.failed.append((title, f"{type(e).__name__}: {e}"))
            print(f"!! {title} FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stdout)
            return None
        print(f"   ({time.perf_counter() - t:.1f} s)", flush=True)
        return out


def _settings(args):
    langs = args.langs.split(",") if args.langs else (["en", "de", "fr"] if args.quick else ["en", "de", "fr", "es"])
    if "en" not in langs:
        langs = ["en"] + langs
    if args.target not in langs:
        raise ValueError(f"--target {args.target!r} must be one of the languages {langs}")
    if args.target == "en":
        raise ValueError("--target must not be en (the prompts are English)")
    n = args.n or (24 if args.quick else 64)
    if n < 8:
        raise ValueError("--n must be >= 8")
    return langs, n


@torch.no_grad()
def generate(model, tok, prompt, max_new_tokens):
    """Greedy continuation of one prompt (batch of 1, no padding)."""
    dev = model.get_input_embeddings().weight.device
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(dev)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, repetition_penalty=1.1, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " ").strip()


def step_heads(steerer, tok, corpus, out, progress, summary, n_texts):
    from xlkernels.analysis import heads as hd
    from xlkernels.analysis.plots import head_heatmaps
    H = steerer.num_heads
    scores = {x: hd.lahis_scores(steerer, tok, texts[:n_texts], batch_size=n_texts, max_length=32,
                                 progress=progress)
              for x, texts in corpus.items()}
    print(f"{n_texts} texts per language, one batch each (forward + backward through the whole model)")
    sets = hd.head_sets(scores)
    fmt = lambda ids: " ".join(f"{l}.{h}" for l, h in (hd.unflat(i, H) for i in ids)) or "-"  # noqa: E731
    print(f"LAHIS scores (layers x heads = {steerer.num_layers} x {H}); heads above the 96% quantile:")
    for x in corpus:
        print(f"  {x:<8} top {fmt(sets['top'][x][:8])}   specific {fmt(sets['specific'][x][:6])}")
    print(f"  general heads (in >= {sets['min_rep']} languages' lists): {fmt(sets['general'])}")
    path = head_heatmaps(scores, os.path.join(out, "heads.png"), title="LAHIS language head importance")
    summary["heads"] = {"top": sets["top"], "general": sets["general"], "specific": sets["specific"]}
    return scores, path


def step_neurons(steerer, tok, corpus, out, progress, summary):
    from xlkernels.analysis import neurons as N

    from .neurons import format_summary, plot_counts
    stats = N.collect_stats(steerer, tok, corpus, batch_size=16, max_length=48, progress=progress)
    p = N.activation_probs(stats)
    lape = N.lape(p)
    cls = N.classify(p)
    langs = list(corpus)
    counts, cc = lape.counts(), cls.counts()
    s = {"languages": langs, "tokens": dict(zip(langs, stats.tokens[0].tolist())),
         "lape": {"top_rate": 0.01, "bar": lape.bar, "selected": int(lape.selected.sum()),
                  "per_language": dict(zip(langs, counts.sum(1).tolist())),
                  "per_language_layer": {x: c for x, c in zip(langs, counts.tolist())}},
         "classes": {"lambda": cls.lam, "lambda_auto": True, "thr": cls.thr, "appear": cls.appear,
                     "specific": dict(zip(langs, cc["specific"].sum(1).tolist())),
                     "related": dict(zip(langs, cc["related"].sum(1).tolist())),
                     "general": int(cc["general"].sum())}}
    print(format_summary(s))
    L = steerer.num_layers
    print("language-specific neurons (LAPE) per layer:")
    print("  layer  " + " ".join(f"{l:>4}" for l in range(L)))
    for x, row in zip(langs, counts.tolist()):
        print(f"  {x:<6} " + " ".join(f"{v:>4}" for v in row))
    stats.save(os.path.join(out, "neuron_stats.safetensors"))
    path = plot_counts(counts, langs, os.path.join(out, "neurons.png"))
    summary["neurons"] = s
    return stats, lape, path


def neuron_steering(steerer, stats, lape, langs, src, tgt):
    """LAPE-style language switch: src-specific neurons off, tgt-specific neurons set to their mean tgt
    activation, in every layer."""
    from xlkernels import NeuronIntervention
    mean = stats.mean()
    s, k = langs.index(src), langs.index(tgt)
    I = steerer.num_neurons
    for l in range(steerer.num_layers):
        off, on = lape.neurons[s][l], lape.neurons[k][l]
        iv = NeuronIntervention.zero(off, I).then(NeuronIntervention.set(on, mean[l, k, on].float(), I))
        steerer.set_neuron_intervention(l, iv)
    return sum(len(x) for x in lape.neurons[s]), sum(len(x) for x in lape.neurons[k])


def step_steer(steerer, tok, corpus, prompts, target, alpha, max_new, progress, neurons, summary, shift):
    from xlkernels.analysis.evaluation.langid import detect
    model = steerer.model
    langs = list(corpus)
    if neurons is None and not shift:
        raise RuntimeError("no language neurons (step 2 failed) and --shift not given: nothing to steer with")
    bank = None
    if shift:
        from xlkernels.analysis.steering import shift as sh
        outs = {x: sh.head_outputs(steerer, tok, texts, batch_size=16, max_length=48, progress=progress)
                for x, texts in corpus.items()}
        bank = sh.shift_bank(outs, pivot="en")
    rows = []
    for pr in prompts:
        steerer.reset()
        row = {"prompt": pr, "plain": generate(model, tok, pr, max_new)}
        if neurons is not None:
            n_off, n_on = neuron_steering(steerer, *neurons, langs, "en", target)
            row[f"neurons_en_to_{target}"] = generate(model, tok, pr, max_new)
            steerer.reset()
        if bank is not None:
            bank.apply(steerer, [target], alpha=alpha)
            row[f"heads_shift_{target}"] = generate(model, tok, pr, max_new)
            steerer.reset()
        rows.append(row)
        print(f"prompt: {pr!r}")
        keys = [k for k in row if k != "prompt"]
        for key, code in zip(keys, detect([row[k] for k in keys])):
            print(f"  {key:<18} [{code}] {row[key]!r}")
    if neurons is not None:
        print(f"neurons_en_to_{target}: the {n_off} English-specific LAPE neurons switched off and the {n_on} "
              f"{target}-specific ones set to their mean {target} activation, in every layer")
    if bank is not None:
        print(f"heads_shift_{target}: per-head shift bank (pivot en) on "
              f"{int(bank.heads[langs.index(target)].sum())} heads, alpha {alpha}")
    print("[xx] = language identified by langid (xlkernels.analysis.langid; 'unknown' when not confident)")
    summary["steering"] = {"target": target, "alpha": alpha, "generations": rows}
    return rows


def step_claims(steerer, tok, corpus, out, quick, summary):
    """A small `xlkernels reproduce` on the demo's corpus: one row per claim (steering: step 3 and `xlkernels eval`)."""
    from xlkernels.analysis.reproduce import measure as reproduce
    small = {"n_lahis": 2} if quick else {}
    rep = reproduce.run(steerer, tok, corpus=corpus, langs=list(corpus)[:3], level="demo", overrides=small,
                        out=os.path.join(out, "claims"), steps=("neurons", "heads", "alignment"),
                        log=lambda *a, **k: None)
    steerer.reset()
    reproduce.print_summary(rep["rows"])
    print("report: claims/report.md in --out; the full run with the steering rows: "
          "`xlkernels reproduce`")
    summary["claims"] = [{k: r.get(k) for k in ("claim", "measured", "holds")} for r in rep["rows"]]
    if rep.get("errors"):
        raise RuntimeError(f"{len(rep['errors'])} claim(s) failed to compute: {rep['errors']}")
    return rep


def run(args) -> int:
    langs, n = _settings(args)
    with staged_dir(args.out) as out:   # every file lands whole in --out at the end
        done = _pipeline(args, out, langs, n)
    if done is None:
        return 1
    rep, total = done
    print("\n== artifacts " + "=" * 60)
    for fn in ("heads.png", "neurons.png", "neuron_stats.safetensors", "demo.json"):
        path = os.path.join(args.out, fn)
        if os.path.exists(path):
            print(f"  {path}")
    print(f"done in {total:.0f} s" + (f"; {len(rep.failed)} step(s) FAILED: " +
                                     "; ".join(t for t, _ in rep.failed) if rep.failed else ""))
    return 1 if rep.failed else 0


def _pipeline(args, out, langs, n):
    """Steps 1-4 writing into `out`; (Report, seconds), or None if the model could not be loaded."""
    import xlkernels
    from xlkernels.analysis.data import parallel_corpus
    progress = not args.no_progress
    prompts = args.prompt or PROMPTS
    alpha = 4.0 if args.alpha is None else args.alpha
    max_new = args.max_new_tokens or (12 if args.quick else 16)
    rep = Report()
    summary = {"settings": {"langs": langs, "n": n, "quick": args.quick, "target": args.target}}
    print("xlkernels demo: language heads, language neurons and steering on one model")
    loaded = rep.step("model", lambda: load_model_from_args(args, progress))
    if loaded is None:
        print("\nthe model could not be loaded; nothing else to do")
        return None
    model, tok, name = loaded
    steerer = xlkernels.patch(model)
    print(f"model {name}: {steerer.num_layers} layers, {steerer.num_heads} heads, {steerer.num_neurons} FFN neurons "
          f"per layer; device {model.get_input_embeddings().weight.device}")
    corpus = parallel_corpus(langs, n)
    print(f"corpus: embedded Django translations, {n} parallel texts per language: {', '.join(langs)}")
    summary["model"] = name
    # LAHIS backpropagates through the 262k-token LM head: the costliest step, so it gets fewer texts
    rep.step("1. language attention heads (LAHIS)", step_heads, steerer, tok, corpus, out, progress, summary,
             min(n, 8 if args.quick else 12))
    neurons = rep.step("2. language neurons (LAPE, specific / related / general)", step_neurons, steerer, tok,
                       corpus, out, progress, summary)
    rep.step(f"3. steering English prompts toward {args.target}", step_steer, steerer, tok, corpus, prompts,
             args.target, alpha, max_new, progress, neurons[:2] if neurons else None, summary, args.shift)
    steerer.reset()
    if not args.no_claims:
        rep.step("4. do the papers' claims hold on this model? (xlkernels reproduce)", step_claims, steerer, tok,
                 corpus, out, args.quick, summary)
    total = time.perf_counter() - rep.t0
    summary["seconds"] = round(total, 1)
    summary["failed"] = [f"{t}: {e}" for t, e in rep.failed]
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return rep, total
