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
    return "\n".join(lines)


def run(args) -> int:
    print(report(args.device))
    return 0
