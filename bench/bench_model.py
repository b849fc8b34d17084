"""Model-level throughput of the HF integration: prefill and decode tokens/s.

Providers (same model, same inputs, same run):
  hf        plain HF model (sdpa attention)
  xlk_off   xlkernels.patch(model), gates 1 / shifts 0, nothing recorded
  xlk_on    patched with random gates and shifts on every head and per-group neuron recording on every layer
  hooks     plain HF model + forward pre-hooks on o_proj (gates, shifts) and forward hooks on mlp.act_fn
            (per-group tokens/positive/sum/sum_sq/max with index_add_/scatter_reduce): the hook equivalent of xlk_on
Models: a Llama-shaped random model (CPU: small; GPU: Llama-8B-shaped layers, a few of them) and, with
--model default|all, the embedded Gemma-3-270M. Logits are computed for the last position only
(logits_to_keep=1) so the numbers measure the decoder stack.

--targets: only hf, xlk_off and xlk_on, more rounds, on CPU one thread and process CPU time; xlk_on records
neurons in prefill only (decode: gates and shifts). Prints the four ratios (off/on x prefill/decode vs hf)
against their targets (TARGETS) as ok/MISS; records model-targets-<model>.

python -m bench.bench_model [--quick] [--device cpu|cuda] [--model llama|default|all] [--targets]
"""
import argparse

import torch

from bench import common

PROVIDERS = ("hf", "xlk_off", "xlk_on", "hooks")
TARGETS = {"xlk_off": 0.97, "xlk_on": 0.95}  # throughput vs hf, prefill and decode (bench/README.md)


def llama(device, dtype, quick):
    cpu = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1408, vocab_size=1024)
    return common.llama_model(device, dtype, quick, cpu, attn_implementation="sdpa")


def default_model(device, dtype, quick):
    from xlkernels.models import load_default

    model, _ = load_default(dtype=dtype, device=device, progress=False)
    model.set_attn_implementation("sdpa")
    return model.eval(), "gemma-3-270m"


class HookSteer:
    """The hook-based equivalent of xlk_on: gate/shift at o_proj's input, stats on mlp.act_fn's output."""

    def __init__(self, model, gate, shift, group_ids, num_groups):
        import xlkernels
        from xlkernels.hf import resolve

        arch, cfg, layers = resolve(model)
        H, D = gate.shape[1], shift.shape[2]
        self.handles, self.group_ids, self.G = [], group_ids, num_groups
        dev = next(model.parameters()).device
        I = getattr(layers[0].mlp, arch.down).in_features
        self.stats = xlkernels.NeuronStats.empty(num_groups, I, device=dev, layers=len(layers))
        for l, layer in enumerate(layers):
            g = gate[l].to(dev)
            s = shift[l].to(dev)

            def pre(mod, args, g=g, s=s):
                x = args[0]
                B, T, _ = x.shape
                x = x.view(B, T, H, D) * g[:, None].to(x.dtype) + s.to(x.dtype)
                return (x.reshape(B, T, H * D),)

            def post(mod, args, out, l=l):
                self._accumulate(l, out)

            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(pre))
            self.handles.append(getattr(layer.mlp, arch.act).register_forward_hook(post))

    def _accumulate(self, l, a):
        st = self.stats
        ids = self.group_ids.reshape(-1)
        keep = ids >= 0
        a = a.reshape(-1, a.shape[-1])[keep]
        ids = ids[keep]
        st.tokens[l].add_(torch.bincount(ids, minlength=self.G))
        st.positive[l].index_add_(0, ids, (a > 0).long())
        a64 = a.double()
        st.sum[l].index_add_(0, ids, a64)
        st.sum_sq[l].index_add_(0, ids, a64 * a64)
        st.max[l].scatter_reduce_(0, ids[:, None].expand_as(a), a.float(), "amax")

    def remove(self):
        for h in self.handles:
            h.remove()


def _quantiles(times):
    import statistics

    xs = sorted(times)
    if len(xs) < 3:
        return {"p50": statistics.median(xs), "p20": xs[0], "p80": xs[-1]}
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"p50": statistics.median(xs), "p20": q[1], "p80": q[7]}


def run_model(model, name, device, quick, rows, B, T, steps, providers=PROVIDERS, rounds=None, clock="wall",
              record_decode=True):
    """Providers are timed round-robin (one call each per round) so machine-load drift hits all alike."""
    import xlkernels

    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    D = getattr(model.config, "head_dim", None) or model.config.hidden_size // H
    g = torch.Generator().manual_seed(0)
    gate = (torch.rand(L, H, generator=g) + 0.5).to(device)
    shift = (torch.randn(L, H, D, generator=g) * 0.1).to(device)
    ids = torch.randint(10, model.config.vocab_size, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    gids = (torch.arange(B, device=device) % 2)[:, None].expand(B, T).contiguous()
    gids1 = gids[:, :1].contiguous()
    rounds = rounds or (3 if quick else (6 if device.type == "cpu" else 10))

    @torch.no_grad()
    def prefill():
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)

    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).past_key_values
    step_ids = ids[:, -1:]
    step_mask = torch.ones(B, T + 1, dtype=torch.long, device=device)
    pos = torch.full((B, 1), T, device=device)

    @torch.no_grad()
    def decode():
        for _ in range(steps):
            model(input_ids=step_ids, attention_mask=step_mask, past_key_values=cache, position_ids=pos,
                  logits_to_keep=1)
            cache.crop(-1)  # drop the new token: every step sees a cache of T

    state = {"hooks": None}

    def enter(provider, gi):
        if state["hooks"] is not None:
            state["hooks"].remove()
            state["hooks"] = None
        if provider in ("hf", "hooks"):
            xlkernels.unpatch(model)
            if provider == "hooks":
                state["hooks"] = HookSteer(model, gate, shift, gi, 2)
            return None
        st = xlkernels.patch(model)
        st.reset()
        if provider == "xlk_on":
            st.gate, st.shift = gate, shift
        return st

    for mode, fn, ntok, gi in (("prefill", prefill, B * T, gids), ("decode", decode, B * steps, gids1)):
        times = {p: [] for p in providers}
        for r in range(rounds + 1):  # round 0 is warm-up
            for provider in providers:
                st = enter(provider, gi)
                if provider == "xlk_on" and (mode == "prefill" or record_decode):
                    def call(fn=fn, st=st):
                        with st.record_neurons(gi, 2):
                            fn()
                else:
                    call = fn
                t = common.timeit(call, warmup=0, rep=1, device=device, clock=clock)
                if r:
                    times[provider].append(t["p50"])
        enter("hf", gi)
        shape = {"model": name, "B": B, "T": T} if mode == "prefill" else \
            {"model": name, "B": B, "cache": T, "steps": steps}
        for provider in providers:
            t = _quantiles(times[provider])
            r = common.rate(t, ntok, 1.0)
            rows.append(common.row("model", provider, mode, shape, "tokens/s", r, ms=t["p50"]))
            print(f"{name:14s} {mode:8s} {provider:8s} {r['p50']:12.1f} tokens/s  ({t['p50']:.1f} ms)", flush=True)


def check_targets(rows) -> list:
    """Lines 'model mode provider ratio >= target ok|MISS' for the providers in TARGETS."""
    out = []
    for r in rows:
        want = TARGETS.get(r["provider"])
        if want is not None and r.get("speedup") is not None:
            ok = "ok" if r["speedup"] >= want else "MISS"
            out.append(f"{r['shape']['model']:14s} {r['mode']:8s} {r['provider']:8s} {r['speedup']:.3f}x vs hf "
                       f"(target >= {want}) {ok}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_model", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--model", choices=("llama", "default", "all"), default="llama")
    p.add_argument("--targets", action="store_true", help="hf/xlk_off/xlk_on only; print the targets' ok/MISS")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per mode (default: 3 quick, 6 CPU, "
                   "10 GPU; --targets: 5 quick, 15)")
    args = p.parse_args(argv)
    device = torch.device(args.device) if args.device else common.default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    providers, clock, rounds = PROVIDERS, "wall", args.rounds
    if args.targets:
        providers, rounds = ("hf", "xlk_off", "xlk_on"), rounds or (5 if args.quick else 15)
        if device.type == "cpu":  # shared machine: one thread, process CPU time
            torch.set_num_threads(1)
            clock = "cpu"
    rows = []
    if args.model in ("llama", "all"):
        model, name = llama(device, dtype, args.quick)
        B, T, steps = ((8, 2048, 16) if not args.quick else (4, 512, 8)) if device.type == "cuda" else \
            ((4, 256, 8) if not args.quick else (2, 64, 4))
        run_model(model, "llama", device, args.quick, rows, B, T, steps, providers, rounds, clock, not args.targets)
        del model
    if args.model in ("default", "all"):
        model, name = default_model(device, dtype, args.quick)
        B, T, steps = (8, 512, 16) if device.type == "cuda" else ((4, 64, 4) if not args.quick else (2, 32, 2))
        run_model(model, name, device, args.quick, rows, B, T, steps, providers, rounds, clock, not args.targets)
    rows = common.ratio(rows, "hf")
    for r in rows:
        if r["provider"] != "hf":
            print(f"{r['shape']['model']:14s} {r['mode']:8s} {r['provider']:8s} vs hf: {r['speedup']:.3f}x")
    meta = {"note": "CPU numbers from a shared 2-core machine are indicative", "clock": clock}
    if args.targets:
        lines = check_targets(rows)
        print("\n".join(["targets:"] + lines))
        meta["targets"] = lines
    name = "model-" + ("targets-" if args.targets else "") + args.model + ("-quick" if args.quick else "")
    path = common.record(rows, name, meta=meta)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
