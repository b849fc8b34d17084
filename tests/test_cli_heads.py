"""`xlkernels heads`, `shift` and `steer` end to end on a tiny model through xlkernels.cli.main."""
import json

import pytest
import torch
from safetensors.torch import load_file

from xlkernels.cli import main

TINY = ["--tiny", "llama", "--no-progress", "--device", "cpu"]


def test_help_has_examples(capsys):
    for cmd in ("heads", "shift", "steer"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"xlkernels {cmd}" in out and "--tiny" in out


def test_heads_end_to_end(tmp_path, capsys):
    from xlkernels.analysis import heads as lahis
    from xlkernels.analysis.steering.plan import SteeringPlan
    out = tmp_path / "h"
    assert main(["heads", *TINY, "--langs", "en,de,fr", "--n", "6", "--batch-size", "4", "--out", str(out),
                 "--mask-lang", "de", "--mask-value", "3"]) == 0
    text = capsys.readouterr().out
    assert "general heads" in text and "de" in text
    summary = json.loads((out / "heads.json").read_text())
    scores = load_file(str(out / "scores.safetensors"))
    assert set(scores) == {"scores.en", "scores.de", "scores.fr"}
    assert summary["num_layers"] == 2 and summary["num_heads"] == 4 and summary["n"]["en"] == 6
    sets = lahis.head_sets({x: scores[f"scores.{x}"] for x in ("en", "de", "fr")}, q=0.96, min_rep=4)
    assert summary["top"] == sets["top"] and summary["specific"] == sets["specific"]
    assert summary["general"] == sets["general"] and summary["min_rep"] == 3
    torch.testing.assert_close(torch.tensor(summary["scores"]["de"]), scores["scores.de"])
    for png in ("heads.png", "heads_en.png", "heads_de.png", "heads_fr.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    plan = SteeringPlan.load(out)
    ids = summary["specific"]["de"][:1]
    flat = plan.gate.flatten()
    assert flat[ids].eq(3.0).all() and (flat != 1).sum() == len(ids)


def test_shift_then_steer(tmp_path, capsys):
    from xlkernels.analysis.steering.plan import SteeringPlan
    out = tmp_path / "s"
    assert main(["shift", *TINY, "--langs", "en,de,fr", "--n", "8", "--k", "2", "--alpha", "3",
                 "--probe", "centroid", "--out", str(out)]) == 0
    plan = SteeringPlan.load(out / "plan.safetensors")
    assert plan.shift.shape == (3, 2, 4, 16) and plan.languages == ["en", "de", "fr"] and plan.alpha == 3.0
    assert all(int((plan.shift[r].abs().sum(-1) > 0).sum()) == 2 for r in range(3))
    info = json.loads((out / "shift.json").read_text())
    assert len(info["languages"]["de"]["heads"]) == 2
    capsys.readouterr()
    assert main(["steer", *TINY, "--plan", str(out), "--target-lang", "de,fr", "--prompt", "Hello",
                 "--prompt", "Bonjour", "--max-new-tokens", "4", "--compare", "--alpha", "20",
                 "--out", str(tmp_path / "g")]) == 0
    res = json.loads((tmp_path / "g" / "steer.json").read_text())
    assert [r["target"] for r in res["results"]] == ["de", "fr"] and res["alpha"] == 20
    assert all("plain" in r and "steered" in r for r in res["results"])
    assert any(r["plain"] != r["steered"] for r in res["results"])      # alpha 20 changes a tiny model
    # same plan through the importance selection, then the errors
    h = tmp_path / "h"
    assert main(["heads", *TINY, "--langs", "en,de,fr", "--n", "4", "--out", str(h)]) == 0
    assert main(["shift", *TINY, "--langs", "en,de,fr", "--n", "6", "--select", "importance", "--importance",
                 str(h / "scores.safetensors"), "--pivot", "en", "--out", str(tmp_path / "s2")]) == 0
    capsys.readouterr()
    assert main(["steer", *TINY, "--plan", str(out), "--prompt", "x"]) == 1
    assert "--target-lang" in capsys.readouterr().err
    assert main(["steer", *TINY, "--plan", str(out), "--target-lang", "ja", "--prompt", "x"]) == 1
    assert "ja" in capsys.readouterr().err
    assert main(["steer", *TINY, "--plan", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert f"--plan {tmp_path / 'nope'}: no such file" in capsys.readouterr().err


def test_errors(tmp_path, capsys):
    assert main(["heads", *TINY, "--n", "0", "--out", str(tmp_path)]) == 1
    assert "--n" in capsys.readouterr().err
    assert main(["heads", *TINY, "--langs", "en,de", "--n", "2", "--mask-lang", "ja", "--out", str(tmp_path)]) == 1
    assert "--mask-lang" in capsys.readouterr().err
    assert main(["shift", *TINY, "--langs", "en,de", "--n", "4", "--pivot", "ja", "--out", str(tmp_path)]) == 1
    assert "--pivot" in capsys.readouterr().err
    assert main(["shift", *TINY, "--langs", "en,de", "--n", "4", "--select", "importance",
                 "--out", str(tmp_path)]) == 1
    assert "--importance" in capsys.readouterr().err
    # a plan for another model shape is refused with a clear message
    from xlkernels.analysis.steering.plan import SteeringPlan
    SteeringPlan(gate=torch.rand(3, 4), meta={"num_layers": 3, "num_heads": 4}).save(tmp_path / "p")
    assert main(["steer", *TINY, "--plan", str(tmp_path / "p"), "--prompt", "x"]) == 1
    assert "num_layers=3" in capsys.readouterr().err


def test_heads_train_mask(tmp_path, capsys):
    from xlkernels.analysis.steering.plan import SteeringPlan
    from xlkernels.analysis.heads.soft_mask import train_soft_mask
    qa = tmp_path / "qa.jsonl"
    pairs = [("The capital of France is", " Paris"), ("Hallo, wie", " geht es dir?")]
    qa.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs) + "\n")
    out = tmp_path / "h"
    assert main(["heads", *TINY, "--langs", "en,de", "--n", "3", "--out", str(out), "--train-mask", str(qa),
                 "--mask-lang", "de", "--mask-k", "3", "--epochs", "2", "--lr", "0.1"]) == 0
    assert "answer loss" in capsys.readouterr().out
    sm = json.loads((out / "heads.json").read_text())["soft_mask"]
    assert sm["lang"] == "de" and sm["k"] == 3 and sm["pairs"] == 2 and len(sm["epoch_losses"]) == 2
    assert sm["loss_after"] < sm["loss_before"]
    scores = load_file(str(out / "scores.safetensors"))["scores.de"]
    # same as the API on the same scores
    import xlkernels
    from xlkernels.models import tiny_model
    model, tok = tiny_model("llama")
    ref = train_soft_mask(xlkernels.patch(model), tok, pairs, scores=scores, k=3, epochs=2, lr=0.1, max_length=128)
    assert sm["heads"] == ref.heads
    torch.testing.assert_close(torch.tensor(sm["values"]), ref.values)
    plan = SteeringPlan.load(out, model=model)
    torch.testing.assert_close(plan.gate, ref.gate)
    assert plan.meta["mask_heads"] == ref.heads and int((plan.gate != 1).sum()) <= 3
    # again from the saved scores, no rescan; default language = the first
    assert main(["heads", *TINY, "--scores", str(out / "scores.safetensors"), "--train-mask", str(qa),
                 "--epochs", "1", "--out", str(tmp_path / "h2")]) == 0
    s2 = json.loads((tmp_path / "h2" / "heads.json").read_text())
    assert s2["soft_mask"]["lang"] == "en" and s2["scores_from"] and s2["n"] is None
    capsys.readouterr()
    qa.write_text('{"prompt": "x"}\n')
    assert main(["heads", *TINY, "--n", "2", "--train-mask", str(qa), "--out", str(out)]) == 2
    assert f"--train-mask {qa}:1" in capsys.readouterr().err
    qa.write_text('{"prompt": "x", "answer": "y"}\n')
    assert main(["heads", *TINY, "--n", "2", "--train-mask", str(qa), "--epochs", "0", "--out", str(out)]) == 1
    assert "--epochs" in capsys.readouterr().err
