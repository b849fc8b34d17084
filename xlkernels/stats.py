"""NeuronStats: per-group FFN neuron statistics, the container filled by `xlkernels.neuron_stats` and `xlkernels.glu`."""
import json

import torch

FIELDS = ("tokens", "positive", "sum", "sum_sq", "max")
DTYPES = {"tokens": torch.int64, "positive": torch.int64, "sum": torch.float64,
          "sum_sq": torch.float64, "max": torch.float32}
_FORMAT = "xlkernels.NeuronStats"


class NeuronStats:
    """Per-group statistics of FFN neuron activations, accumulated over tokens.

    Fields (G groups, I neurons, optional leading dims such as a layer dim L: (L, G, I)):
      tokens   (..., G)    int64   tokens counted per group (rows with group id -1 are skipped)
      positive (..., G, I) int64   tokens with act > 0 (the LAPE activation-probability numerator)
      sum      (..., G, I) float64 sum of act
      sum_sq   (..., G, I) float64 sum of act**2
      max      (..., G, I) float32 max of act (-inf where a group has no token)

    Precision: every kernel widens each activation to float64 before adding it to `sum`/`sum_sq`, and the
    counters are int64, so streaming 1e9 tokens keeps the sums' relative error far below 1e-6 (float32
    accumulation would lose ~1e-3) and counts exact far past 2**31.

    NaN policy: a NaN activation is NOT counted in `positive` (NaN > 0 is false); it propagates into `sum`,
    `sum_sq` and `max` of its (group, neuron), which become NaN; its token is still counted in `tokens`.

    Methods broadcast over leading dims. `merge`, `all_reduce` work in place and return self.
    Derived quantities (`probability`, `mean`, `var`) are float64 and NaN where a group has no tokens.
    """

    __slots__ = FIELDS

    def __init__(self, tokens, positive, sum, sum_sq, max):  # noqa: A002 - field names are the API
        self.tokens, self.positive, self.sum, self.sum_sq, self.max = tokens, positive, sum, sum_sq, max
        self.validate()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, num_groups: int, num_neurons: int, device="cpu", layers=None) -> "NeuronStats":
        """Zeroed stats for `num_groups` groups of `num_neurons` neurons (leading dim `layers` if given)."""
        if int(num_groups) < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if int(num_neurons) < 1:
            raise ValueError(f"num_neurons must be >= 1, got {num_neurons}")
        lead = () if layers is None else ((layers,) if isinstance(layers, int) else tuple(layers))
        g, i = (*lead, int(num_groups)), (*lead, int(num_groups), int(num_neurons))
        kw = dict(device=device)
        return cls(torch.zeros(g, dtype=torch.int64, **kw), torch.zeros(i, dtype=torch.int64, **kw),
                   torch.zeros(i, dtype=torch.float64, **kw), torch.zeros(i, dtype=torch.float64, **kw),
                   torch.full(i, float("-inf"), dtype=torch.float32, **kw))

    @classmethod
    def stack(cls, stats_list) -> "NeuronStats":
        """Stack same-shaped stats along a new leading (layer) dim."""
        stats_list = list(stats_list)
        if not stats_list:
            raise ValueError("stats_list must not be empty")
        for k, s in enumerate(stats_list):
            if not isinstance(s, NeuronStats):
                raise TypeError(f"stats_list[{k}] must be NeuronStats, got {type(s).__name__}")
            if s.sum.shape != stats_list[0].sum.shape:
                raise ValueError(f"stats_list[{k}] has shape {tuple(s.sum.shape)}, "
                                 f"stats_list[0] has {tuple(stats_list[0].sum.shape)}")
        return cls(*(torch.stack([getattr(s, f) for s in stats_list]) for f in FIELDS))

    def layer(self, i: int) -> "NeuronStats":
        """Stats of leading index i (views: accumulating into them updates self)."""
        if self.sum.dim() < 3:
            raise ValueError(f"layer() needs a leading dim; stats have shape {tuple(self.sum.shape)}")
        return NeuronStats(*(getattr(self, f)[i] for f in FIELDS))

    # ---- shape ----------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.sum.shape[-2]

    @property
    def num_neurons(self) -> int:
        return self.sum.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return self.sum.shape

    @property
    def device(self) -> torch.device:
        return self.sum.device

    def validate(self) -> "NeuronStats":
        """Check dtypes, shapes and devices of the fields (ValueError/TypeError naming the field)."""
        for f in FIELDS:
            t = getattr(self, f)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"NeuronStats.{f} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != DTYPES[f]:
                raise TypeError(f"NeuronStats.{f} must be {DTYPES[f]}, got {t.dtype}")
        if self.sum.dim() < 2:
            raise ValueError(f"NeuronStats.sum must have shape (..., G, I), got {tuple(self.sum.shape)}")
        for f in ("positive", "sum_sq", "max"):
            if getattr(self, f).shape != self.sum.shape:
                raise ValueError(f"NeuronStats.{f} has shape {tuple(getattr(self, f).shape)}, "
                                 f"sum has {tuple(self.sum.shape)}")
        if self.tokens.shape != self.sum.shape[:-1]:
            raise ValueError(f"NeuronStats.tokens must have shape {tuple(self.sum.shape[:-1])}, "
                             f"got {tuple(self.tokens.shape)}")
        for f in FIELDS:
            if getattr(self, f).device != self.sum.device:
                raise ValueError(f"NeuronStats.{f} is on {getattr(self, f).device}, sum on {self.sum.device}")
        return self

    # ---- combination ----------------------------------------------------------------------------
    def merge(self, other: "NeuronStats") -> "NeuronStats":
        """Add `other` into self in place (counts/sums add, max takes the max); returns self."""
        if not isinstance(other, NeuronStats):
            raise TypeError(f"other must be NeuronStats, got {type(other).__name__}")
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"other has shape {tuple(other.sum.shape)}, self has {tuple(self.sum.shape)}")
        if other.device != self.device:
            raise ValueError(f"other is on {other.device}, self on {self.device}")
        for f in ("tokens", "positive", "sum", "sum_sq"):
            getattr(self, f).add_(getattr(other, f))
        torch.maximum(self.max, other.max, out=self.max)  # propagates NaN
        _canonical_nan_(self.max)
        return self

    def all_reduce(self, group=None) -> "NeuronStats":
        """Sum counts/sums and max-reduce `max` across torch.distributed ranks, in place; returns self."""
        import torch.distributed as dist
        for f in ("tokens", "positive", "sum", "sum_sq"):
            dist.all_reduce(getattr(self, f), op=dist.ReduceOp.SUM, group=group)
        nan = torch.isnan(self.max).to(torch.int32)  # backends' MAX need not propagate NaN: reduce it apart
        dist.all_reduce(nan, op=dist.ReduceOp.MAX, group=group)
        self.max.masked_fill_(nan.bool(), float("-inf"))
        dist.all_reduce(self.max, op=dist.ReduceOp.MAX, group=group)
        self.max.masked_fill_(nan.bool(), float("nan"))
        return self

    def clone(self) -> "NeuronStats":
        return NeuronStats(*(getattr(self, f).clone() for f in FIELDS))

    def to(self, device) -> "NeuronStats":
        return NeuronStats(*(getattr(self, f).to(device) for f in FIELDS))

    def equal(self, other: "NeuronStats") -> bool:
        """Exact equality of every field (NaN equals NaN)."""
        return all(torch.equal(getattr(self, f), getattr(other, f)) or
                   (getattr(self, f).is_floating_point() and
                    torch.allclose(getattr(self, f), getattr(other, f), rtol=0, atol=0, equal_nan=True))
                   for f in FIELDS)

    # ---- derived --------------------------------------------------------------------------------
    def _per_token(self, x):
        n = self.tokens.to(torch.float64).unsqueeze(-1)
        return x.to(torch.float64) / n  # 0/0 -> NaN where no tokens

    def probability(self) -> torch.Tensor:
        """P(act > 0) per (group, neuron): positive / tokens (float64)."""
        return self._per_token(self.positive)

    def mean(self) -> torch.Tensor:
        """Mean activation per (group, neuron) (float64)."""
        return self._per_token(self.sum)

    def var(self) -> torch.Tensor:
        """Population variance per (group, neuron): E[x^2] - E[x]^2, clamped at 0 (float64)."""
        m = self.mean()
        return (self._per_token(self.sum_sq) - m * m).clamp_min(0)

    # ---- io -------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write to a safetensors file (no pickle)."""
        from safetensors.torch import save_file
        tensors = {f: getattr(self, f).detach().contiguous().cpu() for f in FIELDS}
        save_file(tensors, str(path), metadata={"format": _FORMAT, "shape": json.dumps(list(self.sum.shape))})

    @classmethod
    def load(cls, path, device="cpu") -> "NeuronStats":
        """Read a file written by `save`; shapes and dtypes are validated. A missing, corrupt or foreign file
        raises xlkernels.files.FileError (a ValueError) naming it."""
        from .files import FileError, read_safetensors
        meta, tensors = read_safetensors(path, keys=FIELDS)
        if meta.get("format") != _FORMAT:
            raise FileError(path, f"not a NeuronStats file (format={meta.get('format')!r})")
        if set(tensors) != set(FIELDS):
            raise FileError(path, f"holds tensors {sorted(tensors)}, expected {sorted(FIELDS)}")
        try:
            stats = cls(**tensors)
        except (ValueError, TypeError) as e:
            raise FileError(path, f"malformed NeuronStats ({e})") from None
        _canonical_nan_(stats.max)  # files from other writers may hold x86's negative NaN
        return stats.to(device) if torch.device(device) != stats.device else stats

    def __repr__(self) -> str:
        return (f"NeuronStats(shape={tuple(self.sum.shape)}, tokens={self.tokens.sum().item()}, "
                f"device={self.device})")


def _canonical_nan_(t: torch.Tensor) -> torch.Tensor:
    """Every NaN as the one quiet NaN 0x7fc00000 (in place). The GPU kernels keep a stored NaN through their
    ordered-int atomic max only in that bit pattern; x86 arithmetic makes 0xffc00000, which they rank below 0."""
    return t.masked_fill_(torch.isnan(t), float("nan"))
