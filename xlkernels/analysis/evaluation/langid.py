"""Language identification of generated text, offline: langid.py (Lui & Baldwin 2012; 97 languages, a naive
Bayes model over byte n-grams shipped in the package, 5 MB). Chosen over lingua-language-detector (95 MB)
and fasttext lid.176.ftz by accuracy on the embedded corpus (bench/results/langid-choice.json).

`detect(texts, langs=None)` returns one code per text: an ISO 639-1 code ("de", "zh", ...), or the caller's
own spelling when `langs` is given ("zh_Hans", "pt_BR"), or "unknown" when the text has no letters or the
identifier is not confident (normalised probability < min_confidence). It never guesses. With `langs` the
answer is the likeliest candidate only if the candidates hold at least min_mass of the unrestricted
probability and that candidate at least min_confidence of the candidates' share; so a text in a language
outside `langs` is "unknown", not the nearest candidate.
"""
from __future__ import annotations

import functools
import re

UNKNOWN = "unknown"
MIN_CONFIDENCE = 0.8      # bench/results/langid-choice.json: 97-100% precision at 86-98% coverage
MIN_MASS = 0.5            # with langs: the candidates' share of the unrestricted probability
_LETTER = re.compile(r"[^\W\d_]")
_JUNK = re.compile(r"[\ufffd\x00-\x08\x0b-\x1f\x7f-\x9f]")   # replacement char (broken UTF-8), controls


@functools.lru_cache(maxsize=None)
def _identifier(langs: tuple | None):
    try:
        from langid.langid import LanguageIdentifier, model
    except ImportError as e:   # pragma: no cover - an install problem
        raise ImportError("language identification needs the 'langid' package: pip install langid") from e
    ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    if langs is not None:
        ident.set_languages(list(langs))
    return ident


def supported() -> list:
    """ISO 639-1 codes the identifier knows."""
    return sorted(_identifier(None).nb_classes)


def iso(code: str) -> str:
    """ISO 639-1 code of a corpus / locale code: "zh_Hans" -> "zh", "pt_BR" -> "pt", "de" -> "de"."""
    if not isinstance(code, str) or not code:
        raise ValueError(f"language code must be a non-empty string, got {code!r}")
    return re.split(r"[_-]", code)[0].lower()


def detect(texts, langs=None, min_confidence: float = MIN_CONFIDENCE, min_mass: float = MIN_MASS) -> list:
    """Language code (or "unknown") of each text; see the module docstring.

    texts: a string or a list of strings. langs: candidate codes (any spelling iso() understands); results
    use the same spelling. Raises ValueError for a candidate the identifier does not support or two
    candidates with the same ISO code."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if any(not isinstance(t, str) for t in texts):
        raise TypeError("texts must be strings")
    if not 0.0 <= min_confidence < 1.0:
        raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
    back = None
    if langs is not None:
        langs = [langs] if isinstance(langs, str) else list(langs)
        if not langs:
            raise ValueError("langs must name at least one language (or be None)")
        back = {}
        known = set(supported())
        for x in langs:
            code = iso(x)
            if code not in known:
                raise ValueError(f"langs: {x!r} is not supported by the language identifier "
                                 f"(supported: {', '.join(sorted(known))})")
            if code in back and back[code] != x:
                raise ValueError(f"langs: {back[code]!r} and {x!r} are the same language ({code}) to the identifier")
            back[code] = x
    full = _identifier(None)
    out = []
    for t in texts:
        if not _LETTER.search(t) or _junk(t):
            out.append(UNKNOWN)
            continue
        if back is None:
            code, p = full.classify(t)
            out.append(code if p >= min_confidence else UNKNOWN)
            continue
        probs = dict(full.rank(t))
        mass = sum(probs[c] for c in back)
        code = max(back, key=probs.get)
        # the candidates must be likelier than every other language together, and one must dominate them
        ok = mass >= min_mass and probs[code] >= min_confidence * mass
        out.append(back[code] if ok else UNKNOWN)
    return out


def _junk(text: str) -> bool:
    """Mostly broken bytes / control characters (a random model's output): nothing to identify."""
    visible = len(text) - sum(c.isspace() for c in text)
    return 2 * len(_JUNK.findall(text)) >= max(1, visible)


def rates(texts, langs=None, min_confidence: float = MIN_CONFIDENCE) -> dict:
    """{code: fraction of texts} over detect()'s answers ("unknown" included)."""
    got = detect(texts, langs, min_confidence)
    if not got:
        return {}
    counts = {}
    for c in got:
        counts[c] = counts.get(c, 0) + 1
    return {c: n / len(got) for c, n in sorted(counts.items())}


# ---------------------------------------------------------------------------------------------- generations
DEGENERATE = "degenerate"
MIN_DISTINCT = 3          # a generation needs >= 3 distinct words to be labelled
MAX_TOP_SHARE = 0.5       # ... and no word may be more than half of its words (loops)
_WORD = re.compile(r"[^\W\d_]+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def word_list(text: str) -> list:
    """Letter runs of a text; in CJK scripts every character is a word."""
    out = []
    for w in _WORD.findall(text):
        out += list(w) if _CJK.search(w) else [w.lower()]
    return out


def degenerate(text: str) -> bool:
    """Too few distinct words to identify, or a loop: < MIN_DISTINCT distinct words, or one word more than
    MAX_TOP_SHARE of them (". Die 1.000.0000000", "-A-Wochen-Wochen-Wochen-W")."""
    w = word_list(text)
    if len(set(w)) < MIN_DISTINCT:
        return True
    top = max(w.count(x) for x in set(w))
    return len(w) >= 4 and top / len(w) > MAX_TOP_SHARE


def label(texts, langs=None, min_confidence: float = MIN_CONFIDENCE) -> list:
    """detect() for generations: DEGENERATE for a degenerate text (never a language), else detect()'s answer.
    A degenerate output counts as a failure of whatever a caller measures."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = [DEGENERATE if degenerate(t) else None for t in texts]
    todo = [i for i, o in enumerate(out) if o is None]
    for i, c in zip(todo, detect([texts[i] for i in todo], langs, min_confidence)):
        out[i] = c
    return out


def mixed_rates(texts, target, langs=None) -> dict:
    """Language confusion of generations: {"line": share of non-blank lines labelled the target (a degenerate
    line counts as a miss), "word": share of the words that sit in target lines, "lines": non-blank lines,
    "degenerate": degenerate lines}."""
    lines = [ln for t in texts for ln in t.splitlines() if ln.strip()]
    if not lines:
        return {"line": float("nan"), "word": float("nan"), "lines": 0, "degenerate": 0}
    got = label(lines, langs)
    n = [len(word_list(ln)) for ln in lines]
    hit = [g == target for g in got]
    return {"line": sum(hit) / len(lines), "word": sum(k for k, h in zip(n, hit) if h) / max(1, sum(n)),
            "lines": len(lines), "degenerate": got.count(DEGENERATE)}
