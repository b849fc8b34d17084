"""Helpers shared by the CLI commands: model options and loading, corpus loading."""
import os

import torch


def add_model_arguments(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH", help="local HF model directory or .gguf file")
    g.add_argument("--tiny", default=None, metavar="ARCH", help="random tiny model of ARCH (llama, gemma3, ...)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--debug", action="store_true", help="show tracebacks")


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


def load_corpus(args, n_total):
    """{lang: texts} from --texts files or the embedded parallel corpus (n_total texts per language)."""
    from xlkernels.analysis.data import parallel_corpus
    if args.texts:
        return load_text_files(args.texts, n_total)
    langs = args.langs.split(",") if args.langs else None
    full = parallel_corpus(langs)
    n = min(n_total, min(len(t) for t in full.values()))
    return {lang: texts[:n] for lang, texts in full.items()}


def load_text_files(specs, n):
    """{lang: first n texts} from --texts LANG=FILE specs."""
    from xlkernels.analysis.data import load_texts
    corpus = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--texts must be LANG=FILE, got {spec!r}")
        lang, path = spec.split("=", 1)
        corpus[lang] = list(load_texts(os.path.expanduser(path), lang=lang))[:n]
    return corpus
