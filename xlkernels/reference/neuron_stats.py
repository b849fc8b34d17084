"""Pure-PyTorch neuron statistics (index_add_ over groups). Float64 accumulation; the tests' ground truth."""
import torch


def accumulate(act: torch.Tensor, group_ids: torch.Tensor, tokens, positive, sum_, sum_sq, max_) -> None:
    """Add the stats of act (N, I) grouped by group_ids (N,) (-1 = skip) into the given (G,)/(G, I) tensors.

    NaN policy (see NeuronStats): NaN is not positive, propagates into sum/sum_sq/max, and its token counts.
    """
    ids = group_ids.reshape(-1).long()
    act = act.reshape(ids.numel(), -1)
    keep = ids >= 0
    if not bool(keep.all()):
        act, ids = act[keep], ids[keep]
    if ids.numel() == 0:
        return
    x = act.to(torch.float64)
    tokens.add_(torch.bincount(ids, minlength=tokens.shape[0]).to(tokens.dtype))
    positive.index_add_(0, ids, (x > 0).to(positive.dtype))
    sum_.index_add_(0, ids, x)
    sum_sq.index_add_(0, ids, x * x)
    nan = torch.isnan(x)
    xm = x.to(torch.float32).masked_fill(nan, float("-inf"))
    idx = ids.unsqueeze(1).expand_as(xm)
    was_nan = torch.isnan(max_)
    new = max_.masked_fill(was_nan, float("-inf")).scatter_reduce(0, idx, xm, "amax", include_self=True)
    nan_count = torch.zeros(max_.shape, dtype=torch.int64, device=max_.device).index_add_(0, ids, nan.long())
    new = new.masked_fill(was_nan | (nan_count > 0), float("nan"))
    max_.copy_(new)


def neuron_stats(act: torch.Tensor, group_ids: torch.Tensor, num_groups: int):
    """Fresh stats as a dict of tensors: tokens, positive, sum, sum_sq, max."""
    n_neurons = act.shape[-1]
    dev = act.device
    out = dict(tokens=torch.zeros(num_groups, dtype=torch.int64, device=dev),
               positive=torch.zeros(num_groups, n_neurons, dtype=torch.int64, device=dev),
               sum=torch.zeros(num_groups, n_neurons, dtype=torch.float64, device=dev),
               sum_sq=torch.zeros(num_groups, n_neurons, dtype=torch.float64, device=dev),
               max=torch.full((num_groups, n_neurons), float("-inf"), dtype=torch.float32, device=dev))
    accumulate(act, group_ids, out["tokens"], out["positive"], out["sum"], out["sum_sq"], out["max"])
    return out
