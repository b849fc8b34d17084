import json
import os
import time

import pytest
import torch

from xlkernels import models
from xlkernels.models import ARCHS, load_model, tiny_model, tiny_tokenizer
from xlkernels.models import default as default_mod

TEXTS = ["Hallo Welt, wie geht es dir?", "你好", "ok"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_model_forward_and_left_padded_batch(arch):
    model, tok = tiny_model(arch)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 64, 4, 2)
    assert model.model.layers[0].self_attn.head_dim == 16
    assert tok.padding_side == "left"
    b = tok(TEXTS, return_tensors="pt", padding=True)
    assert b["input_ids"][2, 0] == tok.pad_token_id and b["attention_mask"][2, 0] == 0
    with torch.no_grad():
        out = model(**b).logits
        assert out.shape == (3, b["input_ids"].shape[1], cfg.vocab_size) and torch.isfinite(out).all()
        for i, t in enumerate(TEXTS):   # left padding leaves each row's last logits unchanged
            alone = model(**tok([t], return_tensors="pt")).logits[0, -1]
            torch.testing.assert_close(out[i, -1], alone, rtol=1e-4, atol=1e-4)
    gen = model.generate(**b, max_new_tokens=3, do_sample=False)
    assert gen.shape == (3, b["input_ids"].shape[1] + 3)


def test_tiny_model_sliding_window_is_active():
    model, tok = tiny_model("mistral")
    assert model.config.sliding_window == 4
    ids = tok(["abcdefghij"], return_tensors="pt")
    full, _ = tiny_model("mistral", sliding_window=None)
    with torch.no_grad():
        a, b = model(**ids).logits[0, -1], full(**ids).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-3)    # the window changes the result past 4 tokens


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a, _ = tiny_model("llama", seed=5)
    after = torch.rand(1)
    b, _ = tiny_model("llama", seed=5)
    c, _ = tiny_model("llama", seed=6)
    assert torch.equal(before, after)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_model_arguments():
    m, _ = tiny_model("gemma3", vocab=300, dtype=torch.bfloat16)
    assert m.config.vocab_size == 300 and m.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="arch"):
        tiny_model("gpt5")
    with pytest.raises(ValueError, match="vocab"):
        tiny_model("llama", vocab=100)


def test_tiny_tokenizer_round_trip():
    tok = tiny_tokenizer()
    text = "Grüße, 世界! مرحبا"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    tok.padding_side = "right"
    b = tok(["a", "abc"], padding=True)
    assert b["input_ids"][0][-1] == 0 and b["attention_mask"][0] == [1, 1, 0, 0]


def test_load_model_local_dir_round_trip(tmp_path):
    model, tok = tiny_model("qwen2", seed=4)
    models.save_model(model, tok, tmp_path / "m")
    m2, t2 = load_model(tmp_path / "m")
    assert not m2.training
    b = tok(TEXTS, return_tensors="pt", padding=True)
    b2 = t2(TEXTS, return_tensors="pt", padding=True)
    assert torch.equal(b["input_ids"], b2["input_ids"])
    real = b["attention_mask"].bool()
    with torch.no_grad():   # pad positions may differ (the reload may pick another attention backend)
        torch.testing.assert_close(m2(**b2).logits[real], model(**b).logits[real], rtol=1e-5, atol=1e-5)
    m3, _ = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert m3.dtype == torch.bfloat16


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no network is used") as e:
        load_model("google/gemma-3-270m")
    assert "local directory" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "w.bin")
    model, _ = tiny_model("llama")
    model.save_pretrained(tmp_path / "notok")
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(tmp_path / "notok")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("XLKERNELS_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    assert models.default_cache_path().parent == tmp_path / "c"
    monkeypatch.delenv("XLKERNELS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "xlkernels"


def test_cache_validation(monkeypatch, tmp_path):
    monkeypatch.setenv("XLKERNELS_CACHE", str(tmp_path))
    d = models.default_cache_path()
    d.mkdir(parents=True)
    assert not default_mod._valid(d)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_text("{}")
    (d / "model.safetensors").write_bytes(b"0" * 10)
    sha = default_mod._package().EXPECTED_SHA256
    (d / default_mod._MARKER).write_text(json.dumps({"sha256": sha, "weights_bytes": 10}))
    assert default_mod._valid(d)
    (d / "model.safetensors").write_bytes(b"0" * 9)           # truncated weights
    assert not default_mod._valid(d)
    (d / default_mod._MARKER).write_text("{not json")
    assert not default_mod._valid(d)


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XLKERNELS_CACHE", str(tmp_path))
    pkg = default_mod._package()

    def boom(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(pkg, "assemble", boom)
    with pytest.raises(KeyboardInterrupt):
        models.load_default(progress=False)
    left = [f for f in os.listdir(tmp_path) if not f.endswith(".lock")]   # the (empty) lock file may stay
    assert left == []          # neither the cache nor its temp dir is left behind


@pytest.mark.model
def test_load_default_cached_and_speaks_german():
    t0 = time.perf_counter()
    model, tok = models.load_default(progress=False)   # converts on the first run of a fresh machine
    first = time.perf_counter() - t0
    assert default_mod._valid(models.default_cache_path())
    t0 = time.perf_counter()
    model, tok = models.load_default(progress=False)
    cached = time.perf_counter() - t0
    assert cached < 30, f"cached load took {cached:.1f} s (first {first:.1f} s)"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (18, 640, 4)
    assert model.dtype == torch.float32 and tok.padding_side == "left"
    b = tok(["Guten Morgen! Wie geht es", "Ich wohne in Berlin und"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**b, max_new_tokens=16, do_sample=False)
    text = " ".join(tok.batch_decode(out[:, b["input_ids"].shape[1]:], skip_special_tokens=True))
    words = set(text.lower().replace(".", " ").replace(",", " ").replace("?", " ").split())
    assert words & {"ich", "die", "der", "und", "ist", "bin", "es", "euch", "in", "mit", "nicht"}, text
