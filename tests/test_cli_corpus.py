"""--corpus FILE (and the --texts LANG=FILE shorthand) on every command that reads texts, on a tiny model."""
import argparse
import json

import pytest

from xlkernels import cli
from xlkernels.analysis.data import parallel_corpus
from xlkernels.commands._common import corpus_from_args
from xlkernels.files import FileError

TINY = ["--tiny", "llama", "--no-progress", "--device", "cpu"]
READERS = ("heads", "neurons", "shift", "align", "eval", "reproduce")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for lang, texts in parallel_corpus(["en", "de", "fr"], n=40).items():
            f.writelines(json.dumps({"text": t, "lang": lang}, ensure_ascii=False) + "\n" for t in texts)
    return path


def ns(**kw):
    return argparse.Namespace(**{"corpus": None, "texts": [], "langs": None, **kw})


def test_every_text_command_takes_corpus_and_texts():
    subs = cli.build_parser()._subparsers._group_actions[0].choices
    for cmd in READERS:
        kinds = {a.option_strings[0]: getattr(a, "file_kind", None) for a in subs[cmd]._actions if a.option_strings}
        assert kinds["--corpus"] == "corpus" and kinds["--texts"] == "texts", cmd


def test_corpus_from_args(corpus_file, tmp_path):
    assert corpus_from_args(ns()) is None
    c = corpus_from_args(ns(corpus=str(corpus_file)), n=5)
    assert list(c) == ["en", "de", "fr"] and all(len(t) == 5 for t in c.values())
    c = corpus_from_args(ns(corpus=str(corpus_file), langs="fr,en"))
    assert list(c) == ["fr", "en"] and len(c["en"]) == 40
    with pytest.raises(ValueError, match=r"--langs \['ja'\] not in --corpus"):
        corpus_from_args(ns(corpus=str(corpus_file), langs="en,ja"))
    (tmp_path / "ja.txt").write_text("一\n二\n")
    c = corpus_from_args(ns(corpus=str(corpus_file), texts=[f"ja={tmp_path / 'ja.txt'}"]))
    assert list(c) == ["en", "de", "fr", "ja"] and c["ja"] == ["一", "二"]
    with pytest.raises(FileError, match="carry no language"):   # --corpus needs languages
        corpus_from_args(ns(corpus=str(tmp_path / "ja.txt")))


@pytest.mark.parametrize("cmd", READERS)
def test_command_reads_corpus(cmd, corpus_file, tmp_path, capsys):
    out = tmp_path / "o"
    extra = {"heads": ["--n", "3", "--out", str(out)],
             "neurons": ["--n", "6", "--out", str(out)],
             "shift": ["--n", "8", "--probe", "centroid", "--out", str(out)],
             "align": ["--n", "8", "--no-plot", "--json", str(out / "a.json")],
             "eval": ["--fit", "lape", "--langs", "en,de", "--n-fit", "8", "--n-prompts", "2",
                      "--max-new-tokens", "2", "--strengths", "own", "--out", str(out)],
             "reproduce": ["--quick", "--skip", "steering,soft_mask,heads,alignment,choice,experts", "--out", str(out)]}[cmd]
    rc = cli.main([cmd, *TINY, "--corpus", str(corpus_file), *extra])
    err = capsys.readouterr().err
    assert rc == 0, err
    written = {"heads": "heads.json", "neurons": "summary.json", "shift": "shift.json", "align": "a.json",
               "eval": "eval.json", "reproduce": "reproduce.json"}[cmd]
    text = (out / written).read_text()
    assert '"de"' in text or "'de'" in text, text[:300]
    assert not [p for p in out.iterdir() if p.name.startswith(".partial")]   # no staging left behind
