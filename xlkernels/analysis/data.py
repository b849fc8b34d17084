"""Text data: an offline parallel corpus from Django's gettext catalogs, and loaders for user files.

`parallel_corpus()` reads the human translations that ship with the installed `django` package
(django/conf/locale/<lang>/LC_MESSAGES/django.mo, BSD-3) with the stdlib `gettext` and returns
sentence-aligned lists: entry i is the same message in every language. English ("en") is the msgid.
The messages are short UI strings ("Enter a valid email address."): fine for demos and tests; bring
your own corpus (`load_texts`) for research-scale runs.
"""
import csv
import functools
import gettext
import html
import io
import os
import re

# Languages the default model (Gemma-3-270M) writes; all are in Django's catalogs.
LANGS_DEFAULT = ("en", "de", "fr", "es", "ru", "zh_Hans", "ja", "ar")

MIN_MESSAGES = 200   # locales with fewer translated messages are too sparse to align
_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[-#0 +]*\d*(?:\.\d+)?([sdifr%])")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)\]、。，；：！？])")


def _locale_dir() -> str:
    try:
        import django
    except ImportError as e:
        raise RuntimeError("parallel_corpus needs the `django` package (pip install django); "
                           "or load your own corpus with load_texts(path)") from e
    return os.path.join(os.path.dirname(django.__file__), "conf", "locale")


def _norm(lang: str) -> str:
    """'zh-hans' / 'zh_Hans' / 'pt-BR' -> Django's spelling ('zh_Hans', 'pt_BR')."""
    lang = lang.strip().replace("-", "_")
    head, _, tail = lang.partition("_")
    if not tail:
        return head.lower()
    tail = tail.upper() if len(tail) == 2 else tail.capitalize()
    return f"{head.lower()}_{tail}"


@functools.lru_cache(maxsize=None)
def _catalog(lang: str):
    path = os.path.join(_locale_dir(), lang, "LC_MESSAGES", "django.mo")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        t = gettext.GNUTranslations(f)
    return t


def available_languages(min_messages: int = MIN_MESSAGES) -> list:
    """Languages with at least `min_messages` translated messages, plus "en" (the source)."""
    out = ["en"]
    for lang in sorted(os.listdir(_locale_dir())):
        t = _catalog(lang) if lang != "en" else None
        if t is not None and len(t._catalog) - 1 >= min_messages:
            out.append(lang)
    return out


def _clean(text: str, plural: bool):
    """Resolve placeholders: in plural entries every one is the count ("1"); elsewhere numbers become
    "2" and a message with a string placeholder (a name, a value) is dropped (None)."""
    dropped = False

    def sub(m):
        nonlocal dropped
        kind = m.group(1)
        if kind == "%":
            return "%"
        if plural:
            return "1"
        if kind in "dif":
            return "2"
        dropped = True
        return ""
    text = _PLACEHOLDER.sub(sub, html.unescape(text))
    if dropped:
        return None
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))
    return text.strip()


def _messages(lang: str) -> dict:
    """msgid -> cleaned translation (plural entries take the form for n=1; placeholders resolved)."""
    t = _catalog(lang)
    cat = t._catalog
    form = t.plural(1)
    out = {}
    for key, value in cat.items():
        if isinstance(key, tuple):
            msgid, idx = key
            if idx != form:
                continue
            key = ("plural", msgid)
        if not key or not value:
            continue
        text = _clean(value, isinstance(key, tuple))
        if text is not None:
            out[key] = text
    return out


def _english(key) -> str:
    if isinstance(key, tuple):
        return _clean(key[1], True)
    return _clean(key.split("\x04")[-1], False)   # drop a msgctxt prefix


def parallel_corpus(langs=None, n=None) -> dict:
    """Sentence-aligned texts: {lang: [text_0, ..., text_{n-1}]}, entry i the same message in every language.

    langs: language codes (Django spelling, e.g. "de", "zh_Hans", "pt_BR"; "en" = the English source).
        Default LANGS_DEFAULT. Only messages translated in ALL requested languages are kept, so asking
        for more languages gives fewer entries.
    n: keep the first n entries (None = all). Raises ValueError if fewer exist.
    Order is deterministic: messages of 3+ English words first, each group sorted by msgid. Format
    placeholders are resolved: plural entries take the n=1 form with every placeholder "1"; elsewhere
    numbers become "2" and messages with a string placeholder (a name, a value) are dropped. Entries without letters, or whose text in some language repeats an earlier entry's, are
    dropped, so texts are unique within each language.
    """
    langs = list(LANGS_DEFAULT if langs is None else ([langs] if isinstance(langs, str) else langs))
    if not langs:
        raise ValueError("langs is empty: name at least one language")
    langs = [_norm(x) for x in langs]
    if len(set(langs)) != len(langs):
        raise ValueError(f"langs has duplicates: {langs}")
    tables = {}
    for lang in langs:
        if lang == "en":
            continue
        if _catalog(lang) is None:
            raise ValueError(f"language {lang!r} has no Django catalog; available: "
                             f"{', '.join(available_languages(1))}")
        tables[lang] = _messages(lang)
    keys = None
    for table in tables.values():
        keys = set(table) if keys is None else keys & set(table)
    if keys is None:   # only English asked for: use every msgid of a full catalog
        keys = set(_messages("de"))
    rows = []
    for key in keys:
        row = {"en": _english(key)}
        row.update({lang: table[key] for lang, table in tables.items()})
        if row["en"] is not None and all(re.search(r"\w", row[lang]) and not row[lang].isdigit() for lang in langs):
            rows.append(row)
    rows.sort(key=lambda r: (len(r["en"].split()) < 3, r["en"].lower(), r["en"]))
    seen = {lang: set() for lang in langs}
    out = {lang: [] for lang in langs}
    for row in rows:
        if any(row[lang] in seen[lang] for lang in langs):
            continue
        for lang in langs:
            seen[lang].add(row[lang])
            out[lang].append(row[lang])
    total = len(out[langs[0]])
    if total == 0:
        raise ValueError(f"no message is translated in all of {langs}")
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > total:
            raise ValueError(f"n={n} but only {total} aligned messages exist for {langs}")
        out = {lang: texts[:n] for lang, texts in out.items()}
    return out


def _tsv_rows(reader, path):
    from xlkernels.files import FileError
    try:
        yield from reader
    except csv.Error as e:
        raise FileError(path, f"not valid TSV ({e})", line=reader.line_num) from None


def load_texts(path, lang=None):
    """Read texts from a file: JSONL ({"text": ..., "lang": ...} per line), TSV (lang<TAB>text, or one
    column of text) or plain text (one text per line; blank lines skipped).

    With `lang` given: a list of that language's texts (files without language tags are returned whole).
    Without `lang`: a dict {lang: [texts]} if the file names languages, else a list of texts.
    Raises xlkernels.files.FileError (a ValueError; MissingFileError is also a FileNotFoundError) naming
    the file, and the line where it applies: missing, binary, not UTF-8, bad JSON, empty, language absent.
    """
    from xlkernels.files import FileError, read_jsonl, read_text
    path = os.fspath(path)
    lower = path.lower()
    rows = []   # (lang or None, text)
    with io.StringIO(read_text(path), newline=None) as f:
        if lower.endswith((".jsonl", ".json")):
            for i, obj in read_jsonl(path, f.getvalue()):
                if isinstance(obj, str):
                    rows.append((None, obj))
                elif isinstance(obj, dict) and isinstance(obj.get("text"), str) \
                        and (obj.get("lang") is None or isinstance(obj["lang"], str)):
                    rows.append((obj.get("lang"), obj["text"]))
                else:
                    raise FileError(path, "expected an object with a string \"text\" (and \"lang\") field",
                                    line=i)
        elif lower.endswith(".tsv"):
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for i, cols in enumerate(_tsv_rows(reader, path), 1):
                if not cols or not any(c.strip() for c in cols):
                    continue
                if len(cols) == 1:
                    rows.append((None, cols[0]))
                elif len(cols) == 2:
                    rows.append((cols[0].strip() or None, cols[1]))
                else:
                    raise FileError(path, f"expected 1 or 2 tab-separated columns, got {len(cols)}", line=i)
        else:
            rows = [(None, line.rstrip("\n")) for line in f if line.strip()]
    rows = [(lg, t.strip()) for lg, t in rows if t.strip()]
    if not rows:
        raise FileError(path, "holds no texts (empty corpus)")
    tagged = any(lg is not None for lg, _ in rows)
    if not tagged:
        return [t for _, t in rows]
    by_lang = {}
    for lg, t in rows:
        by_lang.setdefault(lg if lg is not None else "", []).append(t)
    if lang is not None:
        if lang not in by_lang:
            raise FileError(path, f"has no texts for language {lang!r}; it has: {', '.join(sorted(by_lang))}")
        return by_lang[lang]
    return by_lang
