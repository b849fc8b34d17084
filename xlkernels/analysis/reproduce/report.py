"""The reproduce report: the claims table, plots, report.md, reproduce.json, and the verdict changes since a
previous record."""
from __future__ import annotations

import json
import os
import sys

# row key -> (the previous record's row it replaces, what changed in how it is measured since the issue-18 review)
FAMILIES = {
    "lape_ablation": ("LAPE: language neurons are language-specific",
                      "held-out GNOME Help paragraphs, each scored after the preceding one as context (was 1-2 "
                      "word Django strings after BOS); 10 seeds of random neurons matched per layer; bootstrap interval"),
    "neuron_classes": ("Neurons: specific, related and general classes",
                       "per-layer distribution and split-half stability against chance (was: the three classes are "
                       "non-empty)"),
    "lahis_ablation": ("LAHIS: language-specific heads matter for their language",
                       "3 heads per language with general = in >= 80% of the lists (was 1 head, min_rep 4 of 4 "
                       "languages); random heads in the same layers, 10 seeds; held-out paragraphs; bootstrap"),
    "lahis_offtarget": (None, "new row: the paper's off-target claim, against random heads in the same layers"),
    "soft_mask": ("Soft head mask: a few trained head gates help",
                  "a random-gate control (gates trained on random heads in the same layers) and a paired interval "
                  "over held-out pairs (was: one trained gate, -0.005 nats, no control)"),
    "lape_forcing": ("Steering: lape (forcing), en -> de",
                     "strength chosen on dev, reported on test prompts, degenerate outputs fail, fluency under the "
                     "German prompt, 10 seeds of random neurons with the same values"),
    "lape_deactivation": ("Steering: deactivate (neurons), en -> de",
                          "now tests the paper's direction: output leaves English (was: output becomes German, "
                          "which no paper claims)"),
    "itlc": ("Steering: itlc (itlc), en -> de",
             "adds meaning (chrF to the parallel paragraph vs a mismatched one) and confusion; random direction "
             "control; probe trained 100 epochs; the paper's sampling"),
    "claim_divergence": (None, "new row: CLAIM's per-layer divergence curve"),
    "claim_shift": ("Steering: claim (shift), en -> de",
                    "CLAIM's own direction (x -> English) on a forced-choice task, vs random directions of the same "
                    "norm (was: en -> de language switching)"),
    "incline": ("Steering: incline (incline), en -> de",
                "INCLINE's direction (x -> English) with ridge, on retrieval accuracy (was: en -> de switching, "
                "48 pairs, no ridge)"),
    "mexa": ("MEXA: alignment with English peaks in the middle layers",
             "MEXA's claim (correlation with a downstream score across 6 languages; was: a mid-layer peak)"),
    "anc": (None, "new row"),
    "experts": (None, "new row"),
}
REMOVED = {"LAPE: language neurons sit in the bottom and top layers": "no paper states it as a claim; the layer "
           "distribution is in the neuron-classes row",
           "Steering: lahis (gate), en -> de": "no paper claims that LAHIS gates switch the output language"}


def _mark(holds):
    return {True: "holds", False: "does not hold", None: "undecided"}[holds]


def changes(rows, previous) -> list:
    """[(row, verdict before, verdict now, why)] against a previous reproduce.json's rows: matched by key, else
    by claim, else by the row it replaces (FAMILIES); old rows left unmatched are listed as removed."""
    by_key = {r["key"]: r for r in previous or [] if r.get("key")}
    by_claim = {r["claim"]: r for r in previous or []}
    out, used = [], set()
    for r in rows:
        was, why = FAMILIES.get(r.get("key"), (None, "new row"))
        prev = by_key.get(r.get("key")) or by_claim.get(r["claim"])
        if prev is not None:
            why = "same measurement" if prev["holds"] == r["holds"] else "same measurement on new data or settings"
        else:
            prev = by_claim.get(was)
        if prev is not None:
            used.add(prev["claim"])
        out.append((r["claim"], _mark(prev["holds"]) if prev else "-", _mark(r["holds"]), why))
    out += [(c, _mark(r["holds"]), "(row removed)", REMOVED.get(c, "folded into the rows above"))
            for c, r in by_claim.items() if c not in used]
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


def environment(device) -> dict:
    """Versions, commit (when run from a git checkout), device, threads, load and date of a run."""
    import datetime
    import platform
    import subprocess

    import torch
    import transformers

    import xlkernels
    try:
        src = os.path.dirname(os.path.dirname(os.path.abspath(xlkernels.__file__)))
        commit = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    return {"xlkernels": getattr(xlkernels, "__version__", None), "commit": commit, "dirty": dirty,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": str(device), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _env_line(report) -> str:
    e = report.get("environment")
    if not e:
        return ""
    return (f" Commit {e.get('commit')}{' (dirty)' if e.get('dirty') else ''}, torch {e.get('torch')}, "
            f"transformers {e.get('transformers')}, {e.get('device')}, {e.get('torch_threads')} threads, "
            f"{e.get('date')}.")


def previous_rows(out):
    """The rows of the reproduce.json in directory `out`, or None."""
    path = os.path.join(os.fspath(out), "reproduce.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("rows")


def write_report(report: dict, out, previous=None) -> list:
    """report.md and reproduce.json in `out` (plus plots); previous: the rows of an earlier record (default:
    the reproduce.json found in `out`), for the verdict-change table. Returns the file names."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "reproduce.json")
    if previous is None:
        previous = previous_rows(out)
    plots = _plots(report, out)
    with open(path, "w") as f:
        json.dump({k: v for k, v in report.items() if k != "plots_data"}, f, indent=1, ensure_ascii=False)
    sp = report.get("splits", {})
    lines = [f"# xlkernels reproduce: {report['model']}", "",
             f"Level `{report['level']}`; corpus {report.get('corpus', '?')}; languages {', '.join(report['langs'])}; "
             + "; ".join(f"{k} {v['n']} paragraphs (mean {v['mean_words']} words)" for k, v in sp.items())
             + f"; seed {report['seed']}; {sum(report['seconds'].values()):.0f} s." + _env_line(report), "",
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
