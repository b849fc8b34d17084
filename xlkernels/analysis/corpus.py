"""The default parallel corpus of `xlkernels reproduce` and `eval`: GNOME Help, paragraph-aligned, and the
seeded fit / dev / test splits.

GNOME Help (Debian package gnome-user-docs 43.0, CC BY-SA 3.0) is the GNOME desktop's user manual in
Mallard XML: /usr/share/help/<lang>/gnome-help/*.page, one file per page and language. Translations are
made with itstool, which keeps the page structure, so the i-th <p> of a translated page renders the i-th
<p> of the English page. A unit is kept when the page has the same block structure in every requested
language, the English paragraph has >= 5 words, no translation equals the English text (untranslated),
and langid identifies every text as its own language. `make build` (scripts/setup_env.sh) extracts the
package into the venv (<venv>/share/help) with `apt-get download`; an `apt-get install gnome-user-docs`
(/usr/share/help) or XLK_HELP_DIR works too. Nothing is downloaded at run time.
"""
from __future__ import annotations

import functools
import os
import random
import sys
import xml.etree.ElementTree as ET

PACKAGE = "gnome-user-docs"
VERSION = "43.0-2"
LICENSE = "CC BY-SA 3.0"
LANGS_DEFAULT = ("en", "de", "fr", "es", "ru", "zh_Hans", "ja")
DIRS = {"en": "C", "zh_Hans": "zh_CN", "zh_Hant": "zh_TW"}   # our code -> the help directory's name
MIN_WORDS = 5
_NS = "{http://projectmallard.org/1.0/}"
_BLOCKS = ("p", "title", "desc")


def help_root(root=None) -> str:
    """The directory holding C/gnome-help (first of: `root`, $XLK_HELP_DIR, <venv>/share/help,
    /usr/share/help); RuntimeError saying how to get it otherwise."""
    cands = [root, os.environ.get("XLK_HELP_DIR"), os.path.join(sys.prefix, "share", "help"), "/usr/share/help"]
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "C", "gnome-help", "index.page")):
            return c
    raise RuntimeError("the default corpus (GNOME Help) is not installed: run `make build`, or `apt-get install "
                       f"{PACKAGE}`, or set XLK_HELP_DIR to a directory with C/gnome-help; or give --corpus FILE")


def _blocks(path):
    """[(tag, text)] of the page's leaf blocks in document order, or None when it does not parse."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return None
    out = []
    for el in root.iter():
        tag = el.tag.replace(_NS, "")
        if tag in _BLOCKS and not any(c.tag.replace(_NS, "") in ("p", "list", "item", "steps") for c in el):
            out.append((tag, " ".join("".join(el.itertext()).split())))
    return out


def words(text: str) -> int:
    """Words of a text; in CJK scripts (no spaces) every two characters count as one."""
    n = len(text.split())
    cjk = sum("\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" for c in text)
    return max(n, cjk // 2)


def _cache_path(langs, root, lid):
    import hashlib
    stamp = os.stat(os.path.join(root, "C", "gnome-help", "index.page")).st_mtime_ns
    key = hashlib.sha1(repr((langs, os.path.abspath(root), stamp, lid, MIN_WORDS, 1)).encode()).hexdigest()[:16]
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "xlkernels", "corpus", f"gnome-help-{key}.json")


@functools.lru_cache(maxsize=8)
def _aligned(langs: tuple, root: str, lid: bool):
    """The aligned rows, cached on disk (parsing and identifying ~10k paragraphs takes a minute)."""
    import json
    path = _cache_path(langs, root, lid)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    rows = _read(langs, root, lid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    return rows


def _read(langs, root, lid):
    base = os.path.join(root, "C", "gnome-help")
    pages = sorted(p for p in os.listdir(base) if p.endswith(".page"))
    rows, seen = [], set()
    for page in pages:
        en = _blocks(os.path.join(base, page))
        tr = {x: _blocks(os.path.join(root, DIRS.get(x, x), "gnome-help", page)) for x in langs if x != "en"}
        if en is None or any(b is None or [t for t, _ in b] != [t for t, _ in en] for b in tr.values()):
            continue
        for i, (tag, text) in enumerate(en):
            row = {"en": text, **{x: b[i][1] for x, b in tr.items()}}
            if tag != "p" or len(text.split()) < MIN_WORDS or any(row[x] == text for x in tr):
                continue
            if any(row[x] in seen for x in row) or any(words(row[x]) < MIN_WORDS for x in row):
                continue
            seen.update(row.values())
            rows.append(row)
    if lid and rows:
        from .evaluation import langid
        ok = [True] * len(rows)
        for x in langs:
            got = langid.detect([r[x] for r in rows], langs=list(langs))
            ok = [a and g == x for a, g in zip(ok, got)]
        rows = [r for r, k in zip(rows, ok) if k]
    return rows


def help_corpus(langs=None, n=None, root=None, lid: bool = True) -> dict:
    """{lang: [paragraph, ...]}, entry i the same paragraph in every language (see the module doc).

    langs: codes ("en", "de", "zh_Hans", "pt_BR", ...; default LANGS_DEFAULT; must hold "en"). More languages
    give fewer units (only pages translated in all of them count). n: the first n units (ValueError if fewer).
    lid: keep only units that langid identifies as their language in every language (default)."""
    langs = list(LANGS_DEFAULT if langs is None else ([langs] if isinstance(langs, str) else langs))
    if "en" not in langs or len(set(langs)) != len(langs):
        raise ValueError(f"langs must hold 'en' once and no duplicates, got {langs}")
    root = help_root(root)
    missing = [x for x in langs if x != "en" and not os.path.isdir(os.path.join(root, DIRS.get(x, x), "gnome-help"))]
    if missing:
        have = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "gnome-help")))
        raise ValueError(f"GNOME Help has no {missing}; it has: {', '.join(have)} (C = en, zh_CN = zh_Hans)")
    rows = _aligned(tuple(langs), root, lid)
    if not rows:
        raise ValueError(f"no paragraph is translated in all of {langs}")
    if n is not None:
        if not 1 <= n <= len(rows):
            raise ValueError(f"n={n} but {len(rows)} aligned paragraphs exist for {langs}")
        rows = rows[:n]
    return {x: [r[x] for r in rows] for x in langs}


def split(corpus: dict, fractions=(0.5, 0.15, 0.35), seed: int = 0, pivot: str = "en"):
    """Seeded, length-matched (fit, dev, test) splits of a parallel corpus: units sorted by the pivot's word
    count are cut into blocks of 20, each block shuffled and dealt to the splits by `fractions`, so every
    split spans the same lengths. Returns three {lang: texts} dicts, aligned across languages."""
    n = len(corpus[pivot])
    if any(len(t) != n for t in corpus.values()):
        raise ValueError("split needs a parallel corpus (the same number of texts in every language)")
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be 3 positive numbers summing to 1, got {fractions}")
    rng = random.Random(seed)
    order = sorted(range(n), key=lambda i: (words(corpus[pivot][i]), i))
    parts = ([], [], [])
    for s in range(0, n, 20):
        block = order[s:s + 20]
        rng.shuffle(block)
        a = round(len(block) * fractions[0])
        b = a + round(len(block) * fractions[1])
        for part, ids in zip(parts, (block[:a], block[a:b], block[b:])):
            part.extend(ids)
    for p in parts:
        rng.shuffle(p)
    return tuple({x: [t[i] for i in p] for x, t in corpus.items()} for p in parts)


def describe(splits, pivot: str = "en") -> dict:
    """{split name: {"n", "mean_words"}} of (fit, dev, test)."""
    out = {}
    for name, part in zip(("fit", "dev", "test"), splits):
        t = part[pivot]
        out[name] = {"n": len(t), "mean_words": round(sum(words(x) for x in t) / max(1, len(t)), 1)}
    return out
