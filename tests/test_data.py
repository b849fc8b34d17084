import pytest

from xlkernels.analysis.data import LANGS_DEFAULT, available_languages, load_texts, parallel_corpus


def test_default_corpus_is_aligned():
    c = parallel_corpus()
    assert list(c) == list(LANGS_DEFAULT)
    n = len(c["en"])
    assert n >= 150 and all(len(v) == n for v in c.values())
    # a known message lines up across languages
    i = c["en"].index("Enter a valid date.")
    assert c["de"][i] == "Bitte ein gültiges Datum eingeben."
    assert c["fr"][i] == "Saisissez une date valide."
    assert c["ja"][i] == "日付を正しく入力してください。"
    for lang, texts in c.items():
        assert len(set(texts)) == len(texts), lang                       # unique within a language
        assert all(t and t == t.strip() for t in texts)
        assert not any("%(" in t or "%s" in t or "%d" in t for t in texts)   # placeholders resolved
        assert not any("\x04" in t for t in texts)                       # msgctxt stripped


def test_plural_entries_use_the_singular_form():
    c = parallel_corpus(["en", "de", "ru", "ar"])
    i = c["en"].index("1 year")
    assert c["de"][i] == "1 Jahr"
    assert "1" in c["ru"][i]
    assert c["ar"][i]   # Arabic picks its n=1 form, whatever its index


def test_order_is_stable_and_n_takes_a_prefix():
    a = parallel_corpus(["en", "de"], n=20)
    b = parallel_corpus(["de", "en"])
    assert a["en"] == b["en"][:20] and a["de"] == b["de"][:20]
    assert all(len(t.split()) >= 3 for t in a["en"])                    # sentences come first


def test_more_languages_fewer_messages():
    small = parallel_corpus(["en", "de"])
    langs = available_languages()
    assert len(langs) >= 80 and "zh_Hans" in langs and langs[0] == "en"
    everything = parallel_corpus(langs)
    assert 50 <= len(everything["en"]) < len(small["en"])


def test_language_spellings():
    c = parallel_corpus(["EN", "zh-hans", "pt-br"], n=3)
    assert list(c) == ["en", "zh_Hans", "pt_BR"]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="'xx'"):
        parallel_corpus(["en", "xx"])
    with pytest.raises(ValueError, match="n=100000"):
        parallel_corpus(["en", "de"], n=100000)
    with pytest.raises(ValueError, match="empty"):
        parallel_corpus([])
    with pytest.raises(ValueError, match="duplicates"):
        parallel_corpus(["de", "de"])
    with pytest.raises(ValueError, match="n must be"):
        parallel_corpus(["en", "de"], n=0)


def test_load_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "Hallo", "lang": "de"}\n\n{"text": "Hello", "lang": "en"}\n'
                 '{"text": "Welt", "lang": "de"}\n', encoding="utf-8")
    assert load_texts(p) == {"de": ["Hallo", "Welt"], "en": ["Hello"]}
    assert load_texts(p, lang="de") == ["Hallo", "Welt"]
    with pytest.raises(ValueError, match="'fr'"):
        load_texts(p, lang="fr")
    q = tmp_path / "plain.jsonl"
    q.write_text('{"text": "a"}\n"b"\n')
    assert load_texts(q) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_texts(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"sentence": "a"}\n')
    with pytest.raises(ValueError, match="text"):
        load_texts(nofield)


def test_load_tsv_and_plain(tmp_path):
    t = tmp_path / "c.tsv"
    t.write_text("de\tGuten Tag\nen\tGood day\nde\tTschüss\n", encoding="utf-8")
    assert load_texts(t, lang="de") == ["Guten Tag", "Tschüss"]
    one = tmp_path / "one.tsv"
    one.write_text("first line\nsecond line\n")
    assert load_texts(one) == ["first line", "second line"]
    three = tmp_path / "three.tsv"
    three.write_text("a\tb\tc\n")
    with pytest.raises(ValueError, match="three.tsv:1"):
        load_texts(three)
    txt = tmp_path / "c.txt"
    txt.write_text("  eins  \n\nzwei\n", encoding="utf-8")
    assert load_texts(txt) == ["eins", "zwei"]
    assert load_texts(txt, lang="de") == ["eins", "zwei"]   # untagged files are returned whole


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_texts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty corpus"):
        load_texts(empty)
