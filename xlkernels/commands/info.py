"""`xlkernels info`: versions, build, device and the backend each op will use."""
import importlib

import torch

HELP = "print versions, the compiled extension's contents, the device and each op's backend"
EXAMPLES = "  xlkernels info\n  XLKERNELS_BACKEND=reference xlkernels info\n  python -m xlkernels info --device cpu\n"


def add_arguments(p):
    p.add_argument("--device", default=None, help="device to report backends for (default: cuda if present, else cpu)")


def _version(mod: str) -> str:
    try:
        return importlib.import_module(mod).__version__
    except Exception:
        return "not installed"


def report(device=None) -> str:
    import xlkernels
    from xlkernels import backends
    xlkernels.load_ops()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ext = xlkernels.ext_info()
    lines = [
        f"xlkernels     {xlkernels.__version__}",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton        {_version('triton')}",
        f"transformers  {_version('transformers')}",
        f"_C            CPU kernels: {'yes' if ext['cpu'] else 'no'}, CUDA kernels: {'yes' if ext['cuda'] else 'no'}"
        + (f"  ({ext['error']})" if ext["error"] else ""),
        *([f"_C built for  torch {ext['torch']} ({ext['how']}: {ext['path']})"] if ext["cpu"] else []),
        *([f"_C note       {ext['note']}"] if ext.get("note") else []),
        f"device        {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"triton mode   {'interpreter' if backends.interpreting() else 'compiled'}",
        "backends:",
    ]
    for op in sorted(backends.OPS):
        try:
            chosen = backends.select(op, device)
        except backends.BackendUnavailable as e:
            chosen = f"unavailable: {e}"
        lines.append(f"  {op:<20} {chosen}   (has {', '.join(backends.OPS[op])})")
    return "\n".join(lines + _dispatch_lines(device))


# (label, Facts fields other than capability) of calls the dispatch table is shown on
SHAPES = (("prefill T=S=4096 D=128 bf16", dict(head_dim=128, T=4096, S=4096)),
          ("decode T=1 S=4096 D=128 bf16", dict(head_dim=128, T=1, S=4096)),
          ("prefill, 50% heads masked", dict(head_dim=128, T=4096, S=4096, masked_heads=True)),
          ("prefill, gate gradient", dict(head_dim=128, T=4096, S=4096, gate_grad=True)),
          ("prefill, softcap (Gemma2)", dict(head_dim=256, T=4096, S=4096, softcap=True)))


def _dispatch_lines(device) -> list:
    from xlkernels import backends, dispatch
    cap = dispatch.capability(device) if device.type == "cuda" else (9, 0)
    lines = [f"steered_attention on CUDA: rule table (xlkernels/dispatch.py; first match wins; "
             f"{'default' if dispatch.RULES is dispatch.DEFAULT_RULES else 'replaced by set_rules'}):"]
    lines += [f"  {i}. {dispatch.describe(r)}" for i, r in enumerate(dispatch.RULES, 1)]
    forced = backends.forced("steered_attention")
    note = f"forced: {forced}" if forced else "if both backends are available; a forced backend wins"
    lines.append(f"  picks on sm_{cap[0]}{cap[1]}" + ("" if device.type == "cuda" else " (example)") + f" ({note}):")
    for label, kw in SHAPES:
        pick = forced or dispatch.choose(dispatch.Facts(capability=cap, **kw))
        lines.append(f"    {label:<30} {pick}")
    from xlkernels.triton import attention_tma as tma
    where = {"0": "off", "1": "wherever the layout allows"}.get(tma.MODE, "on Hopper (capability 9.x)")
    lines.append(f"  triton forward loads: TMA descriptors {where} (XLKERNELS_TMA={tma.MODE}; "
                 f"{'available' if tma.TensorDescriptor is not None else 'not in this triton'}), "
                 f"warp specialisation {'available' if tma.HAS_WS else 'not in this triton'}")
    return lines


def run(args) -> int:
    print(report(args.device))
    return 0
