"""Rule table: which backend runs steered_attention on CUDA, the fused Triton kernel ('triton') or the best
SDPA kernel (cuDNN / FlashAttention) followed by the CUDA head_steer epilogue ('cuda').

backends.select consults it for CUDA tensors when no backend is forced. Rules are data, tried in order; the
first that matches every fact it names (None = any) and whose backend can run wins. The defaults are
conservative (no GPU measurements yet): SDPA + epilogue, except where only the fused kernel does the job.
Replace the table with set_rules(...) (Rule objects or JSON-style dicts); `xlkernels info` prints it.
Everything here is plain Python on ints and bools, so torch.compile traces it (guards on the comparisons)
and it never reads tensor values (no host sync).
"""
from typing import NamedTuple, Optional

import torch

DECODE_T = 16  # T <= 16 runs the Triton split-KV decode kernel
OPS = ("steered_attention",)


class Facts(NamedTuple):
    """What a call looks like. masked_heads: the caller knows the gate holds exact zeros (and needs no grad)."""
    capability: tuple = (0, 0)
    head_dim: int = 64
    T: int = 1
    S: int = 1
    dtype: str = "bfloat16"
    gate_grad: bool = False
    masked_heads: bool = False
    softcap: bool = False


class Rule(NamedTuple):
    """backend if every given condition holds. Ranges are inclusive (lo, hi) pairs, None = open."""
    backend: str
    why: str = ""
    capability: Optional[tuple] = None   # ((8, 0), (9, 0)): sm_80 to sm_90
    head_dim: Optional[tuple] = None
    T: Optional[tuple] = None            # (None, DECODE_T): decode
    S: Optional[tuple] = None
    dtypes: Optional[tuple] = None       # ("float16", "bfloat16")
    gate_grad: Optional[bool] = None
    masked_heads: Optional[bool] = None
    softcap: Optional[bool] = None


DEFAULT_RULES = (
    Rule("cuda", "the Triton kernels have no float64", dtypes=("float64",)),
    Rule("triton", "SDPA has no softcap: the cuda backend would run math attention", softcap=True),
    Rule("triton", "the fused backward gives d gate from the same pass", gate_grad=True),
    Rule("triton", "only the fused kernel skips masked heads' work", masked_heads=True),
    Rule("cuda", "the best SDPA kernel (cuDNN / FlashAttention) + the head_steer epilogue"),
)
RULES = DEFAULT_RULES
_FIELDS = Rule._fields[2:]


def _within(x, rng) -> bool:
    return rng is None or ((rng[0] is None or x >= rng[0]) and (rng[1] is None or x <= rng[1]))


def matches(rule: Rule, f: Facts) -> bool:
    return (_within(f.capability, rule.capability) and _within(f.head_dim, rule.head_dim)
            and _within(f.T, rule.T) and _within(f.S, rule.S)
            and (rule.dtypes is None or f.dtype in rule.dtypes)
            and (rule.gate_grad is None or rule.gate_grad == f.gate_grad)
            and (rule.masked_heads is None or rule.masked_heads == f.masked_heads)
            and (rule.softcap is None or rule.softcap == f.softcap))


def choose(f: Facts, available=("cuda", "triton"), rules=None) -> str:
    """The first matching rule's backend among `available`; else the first available backend."""
    for rule in RULES if rules is None else rules:
        if rule.backend in available and matches(rule, f):
            return rule.backend
    return available[0]


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def _rule(r) -> Rule:
    if isinstance(r, Rule):
        return r
    if not isinstance(r, dict) or "backend" not in r:
        raise TypeError(f"a rule must be a Rule or a dict with 'backend', got {r!r}")
    unknown = set(r) - set(Rule._fields)
    if unknown:
        raise ValueError(f"unknown rule keys {sorted(unknown)}; rules have {Rule._fields}")
    return Rule(**{k: _tuple(v) for k, v in r.items()})


def set_rules(rules=None) -> tuple:
    """Replace the table (None restores the defaults); returns the previous one. Accepts Rule objects or dicts
    such as json.load gives: {"backend": "triton", "T": [null, 16], "capability": [[9, 0], null]}."""
    global RULES
    new = DEFAULT_RULES if rules is None else tuple(_rule(r) for r in rules)
    for r in new:
        if r.backend not in ("cuda", "triton"):
            raise ValueError(f"rule backend must be 'cuda' or 'triton', got {r.backend!r}")
    old, RULES = RULES, new
    return old


def describe(rule: Rule) -> str:
    conds = [f"{k}={getattr(rule, k)}" for k in _FIELDS if getattr(rule, k) is not None]
    return f"{rule.backend:<7} if {', '.join(conds) or 'always'}: {rule.why}"


_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
           torch.float64: "float64"}


def dtype_name(dtype) -> str:
    return _DTYPES[dtype] if dtype in _DTYPES else str(dtype)


def _capability(device: str) -> tuple:
    return tuple(torch.cuda.get_device_capability(torch.device(device)))


_capability_at_trace = torch.compiler.assume_constant_result(_capability)
_caps: dict = {}


def capability(device) -> tuple:
    """(major, minor) of a CUDA device, cached (a constant under torch.compile)."""
    if torch.compiler.is_compiling():
        return _capability_at_trace(str(device))
    cap = _caps.get(device)
    if cap is None:
        cap = _caps[device] = _capability(str(device))
    return cap
