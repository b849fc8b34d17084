"""The reproduce report: the claims table, plots, report.md, reproduce.json, and the verdict changes since a
previous record."""
from __future__ import annotations

import json
import os
import sys

# family of a row (by its claim's prefix) -> what changed in how it is measured since the issue-18 review
FAMILIES = [
    ("LAPE: a language's neurons", "LAPE: language neurons are language-specific",
     "held-out GNOME Help paragraphs scored in packed windows (was 1-2 word Django strings after BOS); "
     "10 seeds of random neurons matched per layer; bootstrap interval"),
    ("LAPE: forcing", "Steering: lape (forcing)",
     "strength chosen on dev, 64 test prompts, degenerate outputs fail, fluency under the German prompt, "
     "10 seeds of random neurons with the same values"),
    ("LAPE: switching English", "Steering: deactivate (neurons)",
     "now tests the paper's direction: output leaves English (was: output becomes German, which no paper claims)"),
    ("Neurons:", "Neurons: specific, related and general classes",
     "per-layer distribution and split-half stability against chance (was: the three classes are non-empty)"),
    ("LAHIS:", "LAHIS: language-specific heads matter for their language",
     "3 heads per language with general = in >= 80% of the lists (was 1 head, min_rep 4 of 4 languages); "
     "random heads in the same layers, 10 seeds; held-out paragraphs; bootstrap"),
    ("Soft head mask", "Soft head mask: a few trained head gates help",
     "needs a random-gate control (>= 10 trainings) before it can hold; not run"),
    ("CLAIM: language divergence", None, "new row: CLAIM's per-layer divergence curve"),
    ("CLAIM: shifting", "Steering: claim (shift)",
     "CLAIM's own direction (lang -> English) on a forced-choice task, vs random directions of the same norm "
     "(was: en -> de language switching)"),
    ("ITLC", "Steering: itlc (itlc)",
     "adds meaning (chrF to the parallel paragraph vs a mismatched one) and confusion; random direction control; "
     "probe trained 100 epochs"),
    ("INCLINE", "Steering: incline (incline)",
     "INCLINE's direction (lang -> English) with ridge, on retrieval accuracy (was: en -> de switching, "
     "48 pairs, no ridge)"),
    ("MEXA", "MEXA: alignment with English peaks in the middle layers",
     "MEXA's claim (correlation with a downstream score across 6 languages; was: a mid-layer peak)"),
    ("ANC", None, "new row"),
]


def _mark(holds):
    return {True: "holds", False: "does not hold", None: "undecided"}[holds]


def _family(claim):
    return next((f for f in FAMILIES if claim.startswith(f[0])), None)


def changes(rows, previous) -> list:
    """[(new claim, old verdict, new verdict, why)] against a previous reproduce.json's rows."""
    old = {r["claim"]: r for r in previous or []}
    out = []
    for r in rows:
        f = _family(r["claim"])
        prev = old.get(f[1]) if f and f[1] else None
        out.append((r["claim"], _mark(prev["holds"]) if prev else "-", _mark(r["holds"]),
                    f[2] if f else "new row"))
    gone = {f[1] for f in FAMILIES if f[1]}
    out += [(c, _mark(r["holds"]), "(row removed)", "no paper claims it" if "lahis (gate)" in c else
             "folded into the rows above") for c, r in old.items() if c not in gone]
    return out


def format_table(rows, markdown=False) -> str:
    if markdown:
        lines = ["| claim | measured on test | control | interval | result |", "|---|---|---|---|---|"]
        for r in rows:
            res = f"**{_mark(r['holds'])}**" + (f" ({r['note']})" if r.get("note") else "")
            lines.append(f"| {r['claim']} | {r['measured']} | {r.get('control', '')} | {r.get('interval', '')} | {res} |")
        return "\n".join(lines)
    w = max(len(r["claim"]) for r in rows)
    return "\n".join(f"{_mark(r['holds']):<14} {r['claim']:<{w}}  {r['measured']}" for r in rows)


def print_summary(rows, file=None):
    """The claims table as plain text (what `make demo` shows)."""
    print(format_table(rows), file=file or sys.stdout)
    n = sum(r["holds"] is True for r in rows)
    u = sum(r["holds"] is None for r in rows)
    print(f"{n} of {len(rows)} claims hold on this model, {u} undecided", file=file or sys.stdout)


def _plots(report, out) -> list:
    from ..plots import layer_curves, neuron_counts
    made = []
    data = report.get("plots_data", {})
    if data.get("lape_counts"):
        made.append(neuron_counts(data["lape_counts"], os.path.join(out, "lape_layers.png"),
                                  title="LAPE language-specific neurons per layer"))
    if data.get("mexa"):
        made.append(layer_curves(data["mexa"], os.path.join(out, "mexa.png"), ylim=(-0.05, 1.05),
                                 title="MEXA alignment with English (weighted pooling)", xlabel="layer (0 = embeddings)",
                                 ylabel="MEXA"))
    return [os.path.basename(p) for p in made]


def write_report(report: dict, out, previous=None) -> list:
    """report.md and reproduce.json in `out` (plus plots); previous: the rows of an earlier record (default:
    the reproduce.json found in `out`), for the verdict-change table. Returns the file names."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "reproduce.json")
    if previous is None and os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f).get("rows")
    plots = _plots(report, out)
    with open(path, "w") as f:
        json.dump({k: v for k, v in report.items() if k != "plots_data"}, f, indent=1, ensure_ascii=False)
    sp = report.get("splits", {})
    lines = [f"# xlkernels reproduce: {report['model']}", "",
             f"Level `{report['level']}`; corpus {report.get('corpus', '?')}; languages {', '.join(report['langs'])}; "
             + "; ".join(f"{k} {v['n']} paragraphs (mean {v['mean_words']} words)" for k, v in sp.items())
             + f"; seed {report['seed']}; {sum(report['seconds'].values()):.0f} s.", "",
             "A row holds only when its 95% interval clears the criterion against a matched random control "
             "(>= 10 seeds); undecided rows say what would decide them. Strengths are chosen on dev, every "
             "number is on test.", "", format_table(report["rows"], markdown=True), "", "## Departures from the papers", ""]
    lines += [f"- **{r['claim']}**: {r['departures']}" for r in report["rows"] if r.get("departures")]
    if previous is not None:
        lines += ["", "## Verdicts since the previous record", "", "| row | before | now | what changed |",
                  "|---|---|---|---|"]
        lines += [f"| {c} | {a} | {b} | {w} |" for c, a, b, w in changes(report["rows"], previous)]
    if report["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in report["errors"]]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "Seconds per step: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()), ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return ["report.md", "reproduce.json"] + plots
