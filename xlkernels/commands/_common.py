"""Helpers shared by the CLI commands: model options and loading, corpus options and loading, outputs."""
import os

import torch

from ._files import file_option, split_spec


def add_model_arguments(p):
    g = p.add_argument_group("model")
    file_option(g, "--model", kind="model", default=None, metavar="PATH",
                help="local HF model directory or .gguf file")
    g.add_argument("--tiny", default=None, metavar="ARCH", help="random tiny model of ARCH (llama, gemma3, ...)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def add_out_argument(p, default, what="output directory"):
    """--out DIR: created if needed; the command's files in it are replaced, each whole (xlkernels.files)."""
    return file_option(p, "--out", kind="out-dir", default=default, metavar="DIR",
                       help=f"{what} (default ./{default})" if default else what)


def load_model_from_args(args, progress=True):
    """(model, tokenizer, name) from --model / --tiny / the embedded default."""
    from xlkernels import models
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        model, tok = models.tiny_model(args.tiny, dtype=dtype)
        return model.to(device), tok, f"tiny-{args.tiny}"
    if args.model:
        model, tok = models.load_model(os.path.expanduser(args.model), dtype=dtype, device=device)
        return model, tok, os.path.basename(os.path.normpath(args.model))
    model, tok = models.load_default(dtype=dtype, device=device, progress=progress)
    return model, tok, models.DEFAULT_NAME


# ---- corpora -----------------------------------------------------------------------------------------
def add_corpus_arguments(g, note=""):
    """--corpus FILE and --texts LANG=FILE (the shorthand for one language) on a command that reads texts."""
    file_option(g, "--corpus", kind="corpus", default=None, metavar="FILE",
                help="your own corpus: JSONL {\"text\", \"lang\"} or TSV lang<TAB>text (replaces the embedded "
                     "corpus; --langs picks languages from it)" + note)
    file_option(g, "--texts", kind="texts", action="append", default=[], metavar="LANG=FILE",
                help="LANG's texts from FILE (JSONL/TSV/plain text, one text per line; repeatable; adds to or "
                     "replaces LANG of --corpus)")


def load_corpus_file(path) -> dict:
    """{lang: texts} of a --corpus file; FileError if it is unreadable or its texts carry no language."""
    from xlkernels.analysis.data import load_texts
    from xlkernels.files import FileError
    path = os.path.expanduser(path)
    corpus = load_texts(path)
    if not isinstance(corpus, dict):
        raise FileError(path, "its texts carry no language (JSONL \"lang\" or TSV lang<TAB>text); for one "
                              "language use --texts LANG=FILE")
    if "" in corpus:
        raise FileError(path, f"{len(corpus[''])} texts carry no language (JSONL \"lang\" or TSV lang column)")
    return corpus


def corpus_from_args(args, n=None):
    """{lang: first n texts} from --corpus (languages in --langs, if given) and --texts; None if neither."""
    from xlkernels.analysis.data import load_texts
    corpus = {}
    if args.corpus:
        full = load_corpus_file(args.corpus)
        langs = [x.strip() for x in args.langs.split(",") if x.strip()] if args.langs else list(full)
        missing = [x for x in langs if x not in full]
        if missing:
            raise ValueError(f"--langs {missing} not in --corpus {args.corpus} (it has {', '.join(full)})")
        corpus = {x: full[x] for x in langs}
    for spec in args.texts:
        lang, path = split_spec(spec, "LANG=FILE")
        corpus[lang] = load_texts(path, lang=lang)
    if not corpus:
        return None
    return {lang: texts[:n] for lang, texts in corpus.items()} if n is not None else corpus


def load_corpus(args, n_total):
    """{lang: texts} from --corpus / --texts or the embedded parallel corpus (n_total texts per language)."""
    from xlkernels.analysis.data import parallel_corpus
    corpus = corpus_from_args(args, n_total)
    if corpus is not None:
        return corpus
    langs = args.langs.split(",") if args.langs else None
    full = parallel_corpus(langs)
    n = min(n_total, min(len(t) for t in full.values()))
    return {lang: texts[:n] for lang, texts in full.items()}
