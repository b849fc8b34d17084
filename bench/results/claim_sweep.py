"""Why does the CLAIM per-head shift bank not switch Gemma-3-270M's output language? (issue 12 part 4)

Sweeps, with analysis.evaluate on held-out English prompts (target de): strength alpha; head selection by
probe vs LAHIS importance vs all heads; the number of heads k; the estimation position (last token vs
mean); steering at all tokens vs the prompt only vs the generated tokens only. The LAPE neuron forcing
runs beside it as a positive control (the harness can see a language switch). Writes claim_sweep.json/.md
(+ .png) next to this file. Run: nice .venv/bin/python bench/results/claim_sweep.py [--quick]
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(HERE, "claim_sweep"))
    args = ap.parse_args()
    import xlkernels
    from xlkernels.analysis.evaluation import evaluate as ev
    from xlkernels.analysis import heads as hd
    from xlkernels.analysis.steering import shift as sh
    from xlkernels.analysis.data import parallel_corpus
    from xlkernels.analysis.steering.plan import SteeringPlan, model_meta
    from xlkernels.models.default import load_default
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_default(progress=False)
    st = xlkernels.patch(model)
    L, H = st.num_layers, st.num_heads
    langs = ["en", "de", "fr", "es"]
    full = parallel_corpus(langs)
    n_fit = 32 if args.quick else 64
    fit = {x: t[:n_fit] for x, t in full.items()}
    prompts = full["en"][n_fit:n_fit + args.prompts]
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, flush=True)  # noqa: E731
    outs = {pos: {x: sh.head_outputs(st, tok, t, position=pos, batch_size=16, max_length=48) for x, t in fit.items()}
            for pos in ("last", "mean")}
    log("head outputs")
    lahis = {x: hd.lahis_scores(st, tok, fit[x][:12], batch_size=12, max_length=32) for x in ("en", "de")}
    imp = {x: lahis.get(x, torch.zeros(L, H)) for x in langs}
    log("LAHIS scores")
    meta = model_meta(st)
    head_norm = {pos: o["en"].norm(dim=-1).mean(0) for pos, o in outs.items()}   # (L,H) mean |o| on en
    configs, info = {}, {}

    def add(name, pos, k, select):
        bank = sh.shift_bank(outs[pos], pivot="en", k=k, select=select, importance=imp if select == "importance" else None)
        r = bank.languages.index("de")
        m = bank.heads[r]
        rel = float((bank.bank[r].norm(dim=-1)[m] / head_norm[pos][m]).mean())
        configs[name] = SteeringPlan(shift=bank.bank, alpha=1.0, languages=bank.languages, meta=dict(meta))
        ids = m.flatten().nonzero().flatten().tolist()
        info[name] = {"position": pos, "k": int(m.sum()), "select": select, "heads": ids,
                      "score_mean": float(bank.scores[r].flatten()[ids].mean()),
                      "shift_over_head_norm": rel}

    kdef = sh.default_k(L, H)
    add(f"probe-k{kdef}-last", "last", kdef, "probe")
    for k in (12, 36):
        add(f"probe-k{k}-last", "last", k, "probe")
    add(f"all-k{L * H}-last", "last", None, "all")
    add("lahis-k12-last", "last", 12, "importance")
    add("probe-k12-mean", "mean", 12, "probe")
    alphas = (1.0, 4.0, 16.0) if args.quick else (2.0, 8.0, 32.0)
    log("banks", {n: (i["k"], round(i["shift_over_head_norm"], 3)) for n, i in info.items()})
    control = ev.fit_plans(st, tok, fit, "en", "de", methods=("lape",), batch_size=16, max_length=48)
    log("LAPE control fitted")
    runs = []
    res = ev.evaluate(st, tok, dict(configs, **control), prompts, source="en", target="de",
                      strengths=dict({n: alphas for n in configs}, lape=(1.0, 4.0)),
                      max_new_tokens=args.max_new_tokens, batch_size=16)
    runs.append(res)
    log("all tokens done")
    save(args.out, runs, info, prompts, t0)
    best = max((r for r in res["rows"] if r["plan"] in configs), key=lambda r: (r["target_rate"], -r["nll"]))
    keep = [best["plan"]]
    for where in ("prompt", "generated"):
        res = ev.evaluate(st, tok, {n: configs[n] for n in keep}, prompts, source="en", target="de",
                          strengths={n: alphas[1:] for n in keep}, max_new_tokens=args.max_new_tokens,
                          batch_size=16, steer_tokens=where, baseline=False)
        runs.append(res)
        log(f"{where} done")
        save(args.out, runs, info, prompts, t0)


def save(out, runs, info, prompts, t0):
    from xlkernels.analysis.evaluation import evaluate as ev
    rows = []
    for res in runs:
        for r in res["rows"]:
            rows.append(dict(r, plan=r["plan"] if res["steer_tokens"] == "all" else f"{r['plan']} [{res['steer_tokens']} only]",
                             steer_tokens=res["steer_tokens"]))
    base = next(r["nll"] for r in rows if r["plan"] == "unsteered")
    for r in rows:
        r["nll_delta"] = r["nll"] - base
    merged = dict(runs[0], rows=rows, banks=info, seconds=round(time.perf_counter() - t0, 1))
    with open(out + ".json", "w") as f:
        json.dump(merged, f, indent=1, ensure_ascii=False)
    with open(out + ".md", "w") as f:
        f.write(f"# CLAIM shift bank sweep on Gemma-3-270M (en -> de, {len(prompts)} held-out prompts)\n\n")
        f.write("| bank | heads | position | select | mean |alpha=1 shift| / |head output| |\n|---|---:|---|---|---:|\n")
        for n, i in info.items():
            f.write(f"| {n} | {i['k']} | {i['position']} | {i['select']} | {i['shift_over_head_norm']:.3f} |\n")
        f.write("\n" + ev.to_markdown(merged))
    ev.plot(merged, out + ".png", title="CLAIM shift bank on Gemma-3-270M, en -> de")


if __name__ == "__main__":
    sys.exit(main())
