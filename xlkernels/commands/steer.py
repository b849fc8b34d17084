"""`xlkernels steer`: greedy generation with a saved steering plan (gates, shift bank, neuron deactivations)."""
import json
import os
import sys

import torch

from ._common import add_model_arguments, load_model_from_args

HELP = "generate (greedy) with a saved steering plan: head gates, a language shift bank, neuron deactivations"
EXAMPLES = """\
  xlkernels steer --plan xlk_shift --target-lang de --prompt "The weather today is"
  xlkernels steer --plan runs/shift/plan.safetensors --target-lang fr --alpha 6 --compare \\
      --prompt "My favourite food is" --prompt "Yesterday I went to"
  xlkernels steer --plan xlk_heads --prompt "Der Himmel ist" --max-new-tokens 30   # gate plan (no bank)
  xlkernels steer --tiny llama --plan /tmp/p --target-lang de --prompt hi --no-progress
--target-lang takes one language for all prompts or a comma list with one per prompt (bank plans only).
"""


def add_arguments(p):
    add_model_arguments(p)
    s = p.add_argument_group("steering")
    s.add_argument("--plan", required=True, metavar="PATH",
                   help="plan directory or .safetensors written by `xlkernels shift`/`heads` (or SteeringPlan.save)")
    s.add_argument("--target-lang", default=None, help="bank row(s) to steer toward: LANG or LANG1,LANG2,...")
    s.add_argument("--alpha", type=float, default=None, help="shift strength (default: the plan's)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    g.add_argument("prompts", nargs="*", help="more prompts")
    g.add_argument("--max-new-tokens", type=int, default=20)
    g.add_argument("--compare", action="store_true", help="also generate without the plan")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="directory for steer.json (default: print only)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


@torch.no_grad()
def generate(model, tok, prompt, max_new_tokens):
    """Greedy continuation of one prompt (batch of 1: no padding, no position shift)."""
    enc = tok(prompt, return_tensors="pt")
    dev = next(model.parameters()).device
    ids = enc["input_ids"].to(dev)
    mask = enc.get("attention_mask", torch.ones_like(ids)).to(dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad, num_beams=1, temperature=None, top_p=None, top_k=None)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run(args) -> int:
    import xlkernels
    from xlkernels.analysis.plan import SteeringPlan

    prompts = list(args.prompt) + list(args.prompts)
    if not prompts:
        raise ValueError("give at least one prompt (--prompt TEXT or positional)")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    progress = not args.no_progress
    model, tok, name = load_model_from_args(args, progress)
    steerer = xlkernels.patch(model)
    plan = SteeringPlan.load(os.path.expanduser(args.plan), model=steerer)
    bank = plan.shift is not None and plan.shift.dim() == 4
    targets = [None] * len(prompts)
    if bank:
        if not args.target_lang:
            raise ValueError(f"the plan holds a shift bank: pick --target-lang from {plan.languages}")
        names = args.target_lang.split(",")
        if len(names) not in (1, len(prompts)):
            raise ValueError(f"--target-lang has {len(names)} languages for {len(prompts)} prompts")
        targets = names * len(prompts) if len(names) == 1 else names
    elif args.target_lang:
        print("note: the plan has no shift bank; --target-lang is ignored", file=sys.stderr)
    alpha = plan.alpha if args.alpha is None else args.alpha
    desc = []
    if plan.gate is not None:
        desc.append(f"gate on {int((plan.gate != 1).sum())} heads")
    if plan.shift is not None:
        desc.append(f"shift {'bank ' + ','.join(plan.languages) if bank else 'vector'} alpha={alpha:g}")
    if plan.neurons:
        desc.append(f"{sum(v.numel() for v in plan.neurons.values())} neurons off")
    print(f"model {name}; plan: {'; '.join(desc) or 'empty'}", file=sys.stderr)
    rows = []
    for prompt, target in zip(prompts, targets):
        row = {"prompt": prompt, "target": target}
        if args.compare:
            steerer.reset()
            row["plain"] = generate(model, tok, prompt, args.max_new_tokens)
        steerer.reset()
        plan.apply(steerer, target=[target] if target else None, alpha=alpha)
        try:
            row["steered"] = generate(model, tok, prompt, args.max_new_tokens)
        finally:
            steerer.reset()
        rows.append(row)
        head = f"[{target}] " if target else ""
        print(f"{head}{prompt!r}")
        if args.compare:
            print(f"  plain:   {row['plain']!r}")
        print(f"  steered: {row['steered']!r}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "steer.json"), "w") as f:
            json.dump({"model": name, "plan": args.plan, "alpha": alpha, "max_new_tokens": args.max_new_tokens,
                       "results": rows}, f, indent=1, ensure_ascii=False)
        print(f"wrote {args.out}/steer.json")
    return 0
