"""`xlkernels heads`: LAHIS language attention head importance, language-specific and -general heads."""
import json
import os
import sys
import time

import torch

from xlkernels.files import staged_dir

from ._common import add_corpus_arguments, add_model_arguments, add_out_argument, load_corpus, load_model_from_args
from ._files import file_option

HELP = ("find language attention heads: LAHIS head importance per language (one forward+backward per batch), "
        "top 4 percent heads, language-general and language-specific heads")
EXAMPLES = """\
  xlkernels heads                                     # embedded Gemma-3-270M, embedded parallel corpus
  xlkernels heads --langs en,de,fr,es,zh_Hans --n 200 --out runs/heads
  xlkernels heads --mode paper --batch-size 1         # the released code: AdamW step on the mask per text
  xlkernels heads --mask-lang de --mask-value 0       # also write a plan that switches off German's heads
  xlkernels heads --model ~/models/Llama-3.2-3B --texts en=wiki.en.txt --texts de=wiki.de.txt
  xlkernels heads --mask-lang de --train-mask qa_de.jsonl --epochs 2   # soft mask on de's top-k heads
  xlkernels heads --scores runs/heads/scores.safetensors --mask-lang de --train-mask qa_de.jsonl  # no rescan
  xlkernels heads --tiny llama --n 8 --no-progress    # random tiny model (smoke test)
outputs in --out: heads.json (scores, top/general/specific flat ids = layer*H + head), scores.safetensors
(scores.<lang>: (L, H)), heads.png (all languages), heads_<lang>.png, plan.safetensors/.json with --mask-lang
or --train-mask. --train-mask FILE: JSONL lines {"prompt": ..., "answer": ...}; gates on the top --mask-k heads
by --mask-lang's raw LAHIS score (default: the first language) are trained with AdamW on the answer tokens'
NLL; plan.gate = the trained gate; heads.json "soft_mask" has the heads, values, losses before/after/per epoch.
"""


def add_arguments(p):
    add_model_arguments(p)
    d = p.add_argument_group("data")
    d.add_argument("--langs", default=None, help="comma-separated languages of the embedded corpus "
                   "(default: en,de,fr,es,ru,zh_Hans,ja,ar)")
    d.add_argument("--n", type=int, default=100, help="texts per language (default 100; the paper uses 1000)")
    add_corpus_arguments(d)
    d.add_argument("--batch-size", type=int, default=8, help="texts per forward+backward (gradient mode)")
    d.add_argument("--max-length", type=int, default=128, help="tokens per text (the paper truncates at 2048)")
    a = p.add_argument_group("scores")
    a.add_argument("--mode", default="gradient", choices=("gradient", "paper"),
                   help="gradient: gradient at gate 1, batched; paper: the released code's per-text AdamW drift")
    a.add_argument("--q", type=float, default=0.96, help="quantile for the per-language top list (0.96 = top 4%%)")
    a.add_argument("--min-rep", type=int, default=4, help="a head in >= this many lists is language-general "
                   "(clamped to the number of languages)")
    m = p.add_argument_group("plan")
    m.add_argument("--mask-lang", default=None, metavar="LANG", help="write plan.safetensors setting LANG's "
                   "language-specific heads to --mask-value")
    m.add_argument("--mask-value", type=float, default=0.0,
                   help="gate value (0 = ablate, 3 = enhance; default 0; not with --train-mask)")
    m.add_argument("--mask-n", type=int, default=None, help="heads to set (default int(L*H*0.02), at least 1)")
    file_option(m, "--scores", kind="scores", default=None, metavar="FILE", help="scores.safetensors of an earlier "
                "run: skip the LAHIS scan (no corpus or model forward for scores)")
    t = p.add_argument_group("soft mask")
    file_option(t, "--train-mask", kind="pairs", default=None, metavar="FILE", help="train a soft head mask on "
                "JSONL {\"prompt\", \"answer\"} pairs (loss on answer tokens) and save it as the plan's gate")
    t.add_argument("--mask-k", type=int, default=None, help="trainable heads (default int(L*H*0.02), at least 1)")
    t.add_argument("--epochs", type=int, default=2, help="passes over the pairs (default 2)")
    t.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2, weight decay 0.01)")
    t.add_argument("--mask-batch-size", type=int, default=1, help="pairs per step (default 1)")
    o = p.add_argument_group("output")
    add_out_argument(o, "xlk_heads")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check(args):
    for name in ("n", "batch_size", "max_length", "min_rep"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.q < 1.0:
        raise ValueError(f"--q must be in [0, 1), got {args.q}")
    if args.mask_n is not None and args.mask_n < 1:
        raise ValueError("--mask-n must be >= 1")
    for name in ("mask_k", "epochs", "mask_batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")


def read_pairs(path):
    """[(prompt, answer)] from a JSONL file of {"prompt": ..., "answer": ...} objects; FileError if not."""
    from xlkernels.files import FileError, read_jsonl
    path = os.path.expanduser(path)
    pairs = []
    for i, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("answer"), str) or not row["answer"]:
            raise FileError(path, "need {\"prompt\": str, \"answer\": non-empty str}", line=i)
        pairs.append((row["prompt"], row["answer"]))
    if not pairs:
        raise FileError(path, "has no prompt/answer pairs")
    return pairs


def pairs_loss(steerer, tok, pairs, gate, batch_size, max_length):
    from xlkernels.analysis.heads.soft_mask import pairs_loss as loss
    return loss(steerer, tok, pairs, gate, batch_size, max_length)


def load_scores(path):
    """({lang: (L, H) scores}, mode) of a scores.safetensors written by `xlkernels heads`; FileError if not."""
    from xlkernels.files import FileError, json_field, read_safetensors
    path = os.path.expanduser(path)
    meta, t = read_safetensors(path)
    langs = json_field(path, meta, "languages") if "languages" in meta else \
        [k[7:] for k in t if k.startswith("scores.")]
    if not isinstance(langs, list) or not langs or any(f"scores.{x}" not in t for x in langs) \
            or any(t[f"scores.{x}"].dim() != 2 for x in langs):
        raise FileError(path, f"not a scores.safetensors of `xlkernels heads` (tensors {sorted(t)[:4]})")
    return {x: t[f"scores.{x}"].float() for x in langs}, meta.get("mode", "gradient")


def fmt_heads(ids, H, limit=12):
    s = " ".join(f"{i // H}.{i % H}" for i in ids[:limit])
    return s + (f" (+{len(ids) - limit})" if len(ids) > limit else "")


def run(args) -> int:
    import xlkernels
    from safetensors.torch import save_file

    from xlkernels.analysis import heads as lahis
    from xlkernels.analysis import plots
    from xlkernels.analysis.steering.plan import SteeringPlan, model_meta
    from xlkernels.analysis.heads.soft_mask import default_k, train_soft_mask

    _check(args)
    progress = not args.no_progress
    pairs = read_pairs(args.train_mask) if args.train_mask else None
    model, tok, name = load_model_from_args(args, progress)
    if args.scores:
        scores, args.mode = load_scores(args.scores)
        corpus = {x: [] for x in scores}
    else:
        corpus = load_corpus(args, args.n)
    if args.mask_lang is not None and args.mask_lang not in corpus:
        raise ValueError(f"--mask-lang {args.mask_lang!r} is not one of the languages {list(corpus)}")
    steerer = xlkernels.patch(model)
    L, H = steerer.num_layers, steerer.num_heads
    seconds = {}
    if args.scores:
        bad = [x for x, v in scores.items() if tuple(v.shape) != (L, H)]
        if bad:
            raise ValueError(f"--scores {args.scores}: scores for {bad} are not ({L}, {H}) like this model")
        print(f"model {name}: {L} layers x {H} heads; scores of {', '.join(scores)} from {args.scores}",
              file=sys.stderr)
    else:
        print(f"model {name}: {L} layers x {H} heads; languages {', '.join(corpus)}; "
              f"{min(len(t) for t in corpus.values())} texts each; mode {args.mode}", file=sys.stderr)
        scores = {}
        for lang, texts in corpus.items():
            t0 = time.perf_counter()
            scores[lang] = lahis.lahis_scores(steerer, tok, texts, mode=args.mode, batch_size=args.batch_size,
                                              max_length=args.max_length, progress=progress)
            seconds[lang] = round(time.perf_counter() - t0, 3)
    sets = lahis.head_sets(scores, q=args.q, min_rep=args.min_rep)

    with staged_dir(args.out) as out:   # the scores first: a failed soft-mask training keeps them
        save_file({f"scores.{x}": s.contiguous() for x, s in scores.items()}, os.path.join(out, "scores.safetensors"),
                  metadata={"languages": json.dumps(list(scores)), "mode": args.mode})
    summary = {"model": name, "num_layers": L, "num_heads": H, "languages": list(scores), "mode": args.mode,
               "n": None if args.scores else {x: len(t) for x, t in corpus.items()},
               "max_length": args.max_length, "q": args.q,
               "min_rep": sets["min_rep"], "flat_id": "layer * num_heads + head", "seconds": seconds,
               "top": sets["top"], "general": sets["general"], "specific": sets["specific"],
               "scores": {x: s.tolist() for x, s in scores.items()}}
    if args.scores:
        summary["scores_from"] = args.scores
    mask = None
    if pairs is not None:
        lang = args.mask_lang or next(iter(scores))
        k = args.mask_k or default_k(L, H)
        if k > L * H:
            raise ValueError(f"--mask-k {k} is more than the model's {L * H} heads")
        t0 = time.perf_counter()
        mask = train_soft_mask(steerer, tok, pairs, scores=scores[lang], k=k, epochs=args.epochs, lr=args.lr,
                               batch_size=args.mask_batch_size, max_length=args.max_length, progress=progress)
        bs = args.mask_batch_size
        before = pairs_loss(steerer, tok, pairs, torch.ones(L, H), bs, args.max_length)
        after = pairs_loss(steerer, tok, pairs, mask.gate, bs, args.max_length)
        summary["soft_mask"] = {"file": args.train_mask, "pairs": len(pairs), "lang": lang, "k": k,
                                "epochs": args.epochs, "lr": args.lr, "heads": mask.heads,
                                "values": mask.values.tolist(), "loss_before": before, "loss_after": after,
                                "epoch_losses": mask.losses, "seconds": round(time.perf_counter() - t0, 3)}
    with staged_dir(args.out) as out:
        with open(os.path.join(out, "heads.json"), "w") as f:
            json.dump(summary, f, indent=1)
        plots.head_heatmaps(scores, os.path.join(out, "heads.png"), title=f"LAHIS ({name}, {args.mode})")
        for x, s in scores.items():
            plots.head_heatmaps({x: s}, os.path.join(out, f"heads_{x}.png"), title=f"LAHIS {x}")
        wrote = ["heads.json", "scores.safetensors", "heads.png", "heads_<lang>.png"]
        if mask is not None:
            meta = model_meta(steerer)
            sm = summary["soft_mask"]
            meta.update(model=name, corpus_languages=list(scores), source="xlkernels heads --train-mask",
                        mask_lang=sm["lang"], mask_heads=mask.heads)
            SteeringPlan(gate=mask.gate, meta=meta).save(os.path.join(out, "plan.safetensors"))
            wrote.append("plan.safetensors")
            print(f"soft mask on {len(mask.heads)} {sm['lang']} heads: answer loss {sm['loss_before']:.4f} -> "
                  f"{sm['loss_after']:.4f}; gates " + " ".join(f"{h // H}.{h % H}={v:.3f}"
                                                                for h, v in zip(mask.heads, sm["values"])))
        elif args.mask_lang is not None:
            n = args.mask_n or default_k(L, H)
            ids = sets["specific"][args.mask_lang][:n]
            gate = torch.ones(L * H)
            gate[ids] = args.mask_value
            meta = model_meta(steerer)
            meta.update(model=name, corpus_languages=list(scores), source="xlkernels heads", mask_lang=args.mask_lang,
                        mask_heads=ids)
            SteeringPlan(gate=gate.view(L, H), meta=meta).save(os.path.join(out, "plan.safetensors"))
            wrote.append("plan.safetensors")
            print(f"plan: gate {args.mask_value:g} on {len(ids)} {args.mask_lang}-specific heads", file=sys.stderr)

    print(f"{'lang':<8}{'top':>5}{'specific':>10}  specific heads (layer.head, by score)")
    for x in scores:
        print(f"{x:<8}{len(sets['top'][x]):>5}{len(sets['specific'][x]):>10}  {fmt_heads(sets['specific'][x], H)}")
    print(f"general heads (in >= {sets['min_rep']} lists): {fmt_heads(sets['general'], H) or '-'}")
    print(f"wrote {args.out}/" + ", ".join(wrote))
    return 0
