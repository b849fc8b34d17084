"""`xlkernels reproduce` end to end on a tiny random model and a parallel corpus made here from word lists:
every row of measure.ROWS comes out once, with a verdict, through `reproduce.run` and through the CLI. The
level is shrunk through measure.LEVELS, so both runs take seconds."""
import json
import math
import random

import pytest
import torch

from xlkernels.analysis.reproduce import measure as rp

# word i means the same in every language, so sentences built from the same ids are parallel
WORDS = {
    "en": "the file window folder user opens saves closes shows settings button new old small large quickly".split(),
    "de": "die Datei Fenster Ordner Benutzer öffnet speichert schließt zeigt Einstellungen Knopf neue alte "
          "kleine große schnell".split(),
    "fr": "le fichier fenêtre dossier utilisateur ouvre enregistre ferme montre paramètres bouton nouveau vieux "
          "petit grand vite".split(),
}
TINY = dict(seeds=2, n_nll=6, n_lahis=4, lahis_heads=1, max_length=32, new_tokens=4, n_prompts=6, itlc_epochs=5,
            forcing=(1.0,), itlc=(2.0,), claim_alpha=(2.0,), incline_sigma=(0.5,), n_offtarget=3, n_choice=6,
            n_experts=6, mask_train=4, mask_seeds=2, mask_epochs=1, choice_langs=("de", "fr"))


def parallel_corpus(seed, n=30):
    rng = random.Random(seed)
    rows = [[rng.randrange(len(WORDS["en"])) for _ in range(rng.randint(5, 8))] for _ in range(n)]
    return {x: [" ".join(w[i] for i in r).capitalize() + "." for r in rows] for x, w in WORDS.items()}


def check_rows(rows):
    assert [r["key"] for r in rows] == list(rp.ROWS)
    for r in rows:
        assert r["holds"] in (True, False, None) and r["claim"] and r["measured"], r
        if r["holds"] is None:
            assert r["note"], f"an undecided row must say what it needs: {r['claim']}"
        elif not r["measured"].startswith("not measured"):
            assert r["control"] and r["interval"], r["claim"]


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model gains nothing from a second torch thread; on a loaded machine its spinning costs twice the
    CPU time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def seed():
    """A fresh corpus and model seed per run (printed)."""
    s = random.randrange(1 << 30)
    print(f"corpus seed {s}")
    return s


def test_run_end_to_end_writes_every_row(tmp_path, seed):
    from xlkernels.models import tiny_model
    model, tok = tiny_model("llama", seed=seed % 1000)
    rep = rp.run(model, tok, corpus=parallel_corpus(seed), level="quick", overrides=TINY, out=str(tmp_path),
                 name="tiny", log=lambda *a: None)
    assert rep["errors"] == []
    check_rows(rep["rows"])
    assert {r["key"] for r in rep["rows"] if r["measured"].startswith("not measured")} <= {"lape_forcing",
                                                                                         "lape_deactivation"}
    saved = json.loads((tmp_path / "reproduce.json").read_text())
    assert [r["key"] for r in saved["rows"]] == list(rp.ROWS)
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["date"]
    assert f"torch {torch.__version__}" in (tmp_path / "report.md").read_text()
    lape = next(r for r in saved["rows"] if r["key"] == "lape_ablation")
    assert set(lape["details"]["split_half_jaccard"]) == {"en", "de", "fr"} and "Jaccard" in lape["measured"]
    assert saved["splits"]["test"]["n"] + saved["splits"]["dev"]["n"] + saved["splits"]["fit"]["n"] == 30
    # a second record lists what changed against the first, row by row
    again = rp.run(model, tok, corpus=parallel_corpus(seed), level="demo", overrides=dict(TINY, n_offtarget=0),
                   out=str(tmp_path), name="tiny", log=lambda *a: None)
    check_rows(again["rows"])
    md = (tmp_path / "report.md").read_text()
    assert "## Verdicts since the previous record" in md
    assert md.count("| same measurement") + md.count("| same measurement on new data") >= 5
    skipped = [r for r in again["rows"] if r["measured"].startswith("not measured")]
    assert {r["key"] for r in skipped} >= {"soft_mask", "itlc", "claim_shift", "experts", "lahis_offtarget"}
    assert all("level demo" in r["note"] for r in skipped)


def test_cli_end_to_end(tmp_path, seed, monkeypatch, capsys):
    from xlkernels import cli
    corpus = parallel_corpus(seed, 24)
    tsv = tmp_path / "corpus.tsv"
    tsv.write_text("".join(f"{x}\t{t}\n" for x, texts in corpus.items() for t in texts), encoding="utf-8")
    monkeypatch.setitem(rp.LEVELS, "quick", dict(rp.LEVELS["quick"], langs=("en", "de", "fr"), **TINY))
    out = tmp_path / "out"
    code = cli.main(["reproduce", "--tiny", "llama", "--quick", "--corpus", str(tsv), "--out", str(out),
                     "--no-progress", "--skip", "soft_mask,steering"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "reproduce.json").read_text())["rows"]
    check_rows(rows)
    assert all("skipped" in r["note"] for r in rows if rp.ROWS[r["key"]][0] in ("soft_mask", "steering"))
    assert "claims hold on this model" in capsys.readouterr().out
    assert cli.main(["reproduce", "--tiny", "llama", "--corpus", str(tsv), "--skip", "nope", "--out", str(out)]) == 1
    assert "--skip ['nope'] unknown" in capsys.readouterr().err
    plain = tmp_path / "c.txt"
    plain.write_text("just text\nno language\n")
    assert cli.main(["reproduce", "--tiny", "llama", "--corpus", str(plain), "--out", str(out)]) == 2  # a bad file
    assert "--corpus" in capsys.readouterr().err
    # a rerun into the same --out compares with the record there (read before the staged files replace it)
    seen = []
    real = rp.write_report
    monkeypatch.setattr(rp, "write_report", lambda rep, o, prev=None: seen.append(prev) or real(rep, o, prev))
    assert cli.main(["reproduce", "--tiny", "llama", "--quick", "--corpus", str(tsv), "--out", str(out),
                     "--no-progress", "--skip", ",".join(rp.STEPS)]) == 0
    assert seen and [r["key"] for r in seen[0]] == [r["key"] for r in rows]
    assert json.loads((out / "reproduce.json").read_text())["rows"] != rows   # replaced: every row undecided now


def test_split_half_jaccard():
    class Sel:
        def __init__(self, per_lang):
            self.neurons = [[torch.tensor(ids.get(l, []), dtype=torch.long) for l in range(2)] for ids in per_lang]
    a = Sel([{0: [1, 2, 3], 1: [4]}, {}])
    b = Sel([{0: [2, 3], 1: [4, 5]}, {1: [7]}])
    j = rp.split_half_jaccard([a, b], ["en", "de"], 2)
    assert j["en"] == pytest.approx(3 / 5) and j["de"] == 0.0
    assert math.isnan(rp.split_half_jaccard([a, a], ["en", "de"], 2)["de"])


def test_every_level_is_valid():
    for level in rp.LEVELS:
        cfg = rp.settings(level)
        assert cfg["seeds"] >= 10 and cfg["level"] == level
    default = rp.settings("default")
    assert default["n_prompts"] >= 64 and default["n_choice"] >= 64   # issue 18: at least 64 prompts


def test_bad_settings_name_the_argument():
    from xlkernels.models import tiny_model
    model, tok = tiny_model("llama")
    corpus = parallel_corpus(1)
    with pytest.raises(ValueError, match="n_nll"):
        rp.run(model, tok, corpus=corpus, level="quick", overrides=dict(TINY, n_nll=1))
    few = rp.run(model, tok, corpus=parallel_corpus(2, 12), level="demo", overrides=dict(TINY, seeds=10, n_nll=10,
                 n_choice=10, n_offtarget=0, n_prompts=10), steps=("neurons",), log=lambda *a: None)
    row = few["rows"][0]     # 12 texts give 4 test texts: 4 control seeds, so the row cannot hold
    assert few["settings"]["seeds"] == 4 and "4 seeds" in row["control"] and row["holds"] is not True
    with pytest.raises(ValueError, match="level must be one of"):
        rp.run(model, tok, corpus=corpus, level="huge")
    with pytest.raises(ValueError, match="parallel corpus"):
        rp.run(model, tok, corpus=dict(corpus, fr=corpus["fr"][:-1]), level="quick", overrides=TINY)
