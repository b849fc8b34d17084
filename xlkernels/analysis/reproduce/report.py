"""The reproduce report: the claims table (text / Markdown), its matrix plots, report.md and reproduce.json."""
from __future__ import annotations

import json
import os
import sys

import torch

from . import claims


def _mark(holds):
    return {True: "holds", False: "does not hold", None: "undecided"}[holds]


def format_table(rows, markdown=False) -> str:
    if markdown:
        lines = ["| claim | paper | measured | result |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['claim']} | {r['paper']} | {r['measured']} | **{_mark(r['holds'])}** |")
        return "\n".join(lines)
    w = max(len(r["claim"]) for r in rows)
    return "\n".join(f"{_mark(r['holds']):<14} {r['claim']:<{w}}  {r['measured']}" for r in rows)


def print_summary(rows, file=None):
    """The claims table as plain text (what `make demo` shows)."""
    print(format_table(rows), file=file or sys.stdout)
    n = sum(r["holds"] is True for r in rows)
    print(f"{n} of {len(rows)} claims hold on this model", file=file or sys.stdout)


def _matrix_plot(m, rows, cols, path, title, label, ylabel):
    from ..plots import _plt, _save
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2, 0.9 * len(rows) + 1.2), layout="constrained")
    t = torch.as_tensor(m, dtype=torch.float64)
    lim = float(t.abs().max()) or 1.0
    im = ax.imshow(t.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            ax.text(j, i, f"{float(t[i, j]):+.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("evaluated language")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8).set_label(label, fontsize=8)
    return _save(fig, path)


def _plots(report, out) -> list:
    from ..plots import layer_curves, neuron_counts
    made = []
    rows = {r["claim"]: r for r in report["rows"]}
    lape = next((r for r in report["rows"] if r["claim"].startswith("LAPE: language neurons are")), None)
    if lape and "delta" in lape["details"]:
        d = lape["details"]
        made.append(_matrix_plot(d["delta"], d["langs"], d["langs"], os.path.join(out, "lape_deactivation.png"),
                                 "LAPE: NLL increase when a language's neurons are off", "nats",
                                 "neurons switched off"))
    lahis = next((r for r in rows.values() if r["claim"].startswith("LAHIS") and "delta" in r["details"]), None)
    if lahis:
        d = lahis["details"]
        made.append(_matrix_plot(d["delta"], d["langs"], d["langs"], os.path.join(out, "lahis_masking.png"),
                                 "LAHIS: loss increase when a language's specific heads are masked", "nats",
                                 "heads masked"))
    data = report.get("plots_data", {})
    if data.get("lape_counts"):
        made.append(neuron_counts(data["lape_counts"], os.path.join(out, "lape_layers.png"),
                                  title="LAPE language-specific neurons per layer"))
    if data.get("mexa"):
        made.append(layer_curves(data["mexa"], os.path.join(out, "mexa.png"), ylim=(-0.05, 1.05),
                                 title="MEXA alignment with English (weighted pooling)", xlabel="layer (0 = embeddings)",
                                 ylabel="MEXA"))
    return [os.path.basename(p) for p in made]


def write_report(report: dict, out) -> list:
    """report.md (table, settings, plots) and reproduce.json in `out`; returns the file names."""
    os.makedirs(out, exist_ok=True)
    plots = _plots(report, out)
    with open(os.path.join(out, "reproduce.json"), "w") as f:
        json.dump({k: v for k, v in report.items() if k != "plots_data"}, f, indent=1)
    s = report["settings"]
    lines = [f"# xlkernels reproduce: {report['model']}", "",
             f"Level `{report['level']}`; languages {', '.join(report['langs'])}; "
             f"{min(report['n_fit'].values())} fit / {min(report['n_eval'].values())} held-out texts per language; "
             f"seed {report['seed']}; {sum(report['seconds'].values()):.0f} s.", "",
             format_table(report["rows"], markdown=True), "",
             "Criteria (xlkernels/analysis/claims.py): LAPE own-language increase >= "
             f"{claims.LAPE_FACTOR:g}x the others'; layers: the first and the last quarter of the layers "
             f"each hold >= {claims.EDGE_RATIO:g}x the neurons per layer of the middle half; LAHIS: own > others and own > random "
             f"({s['seeds']} seeds); soft mask: held-out answer loss lower; classes: all three non-empty; MEXA: mean "
             f"curve peaks in the middle half, above the embeddings; steering: >= {claims.STEER_RATE:.0%} of "
             "generations in the target language.", ""]
    if report["errors"]:
        lines += ["Errors:", ""] + [f"- {e}" for e in report["errors"]] + [""]
    lines += [f"![{p}]({p})" for p in plots]
    res = report.get("plots_data", {}).get("eval")
    if res is not None:
        from ..evaluation import evaluate as E
        E.save(res, out, title=f"{report['model']}: steering {res['source']} -> {res['target']}")
        lines += ["", f"## Steering sweep ({res['source']} -> {res['target']}, {len(res['prompts'])} held-out "
                  f"prompts, {res['max_new_tokens']} new tokens; eval.json has every generation)", "",
                  E.to_markdown(res), "![eval.png](eval.png)"]
        plots += ["eval.json", "eval.md", "eval.png"]
    lines += ["", "Seconds per step: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()), ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return ["report.md", "reproduce.json"] + plots
