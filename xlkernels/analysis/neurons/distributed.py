"""Data-parallel corpus statistics under torchrun: every rank runs its share of the batches (the same batches
one process would run, so the reduced statistics equal the single-process ones), then NeuronStats.all_reduce.

    torchrun --nproc_per_node 2 -m xlkernels.analysis.neurons.distributed --tiny llama --out stats.safetensors
"""
from __future__ import annotations

import argparse

import torch

from .stats import collect_stats


def reduce_device(group=None) -> torch.device:
    """Where the reduction runs: this rank's GPU for NCCL, CPU otherwise (gloo)."""
    import torch.distributed as dist
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_stats(stats, group=None):
    """Sum the per-rank NeuronStats (max for `max`) on the reduction device; returns new stats on CPU.
    Stats living on another device (e.g. the last layer's GPU of a device_map model) are moved first."""
    stats = stats.to(reduce_device(group)).clone()
    stats.all_reduce(group)
    return stats.to("cpu")


def collect_stats_distributed(steerer_or_model, tokenizer, corpus: dict, batch_size: int = 8,
                              max_length: int = 256, progress: bool = False, packing: bool = False, group=None):
    """`collect_stats` on this rank's batches (batch i goes to rank i % world_size), all-reduced over `group`.
    Needs an initialized torch.distributed process group. Works with device_map models: the stats are moved
    to the reduction device before the all-reduce."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized (run under torchrun and call "
                           "torch.distributed.init_process_group first)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local = collect_stats(steerer_or_model, tokenizer, corpus, batch_size, max_length,
                          progress=progress and rank == 0, packing=packing, shard=(rank, world))
    return all_reduce_stats(local, group)


def main(argv=None) -> int:
    import torch.distributed as dist

    import xlkernels
    from xlkernels.analysis.data import parallel_corpus
    p = argparse.ArgumentParser(prog="python -m xlkernels.analysis.neurons.distributed",
                                description="per-language neuron statistics, data parallel (run under torchrun)")
    p.add_argument("--model", default=None, help="local model path or .gguf (default: the embedded model)")
    p.add_argument("--tiny", default=None, metavar="ARCH", help="random tiny model of ARCH (tests)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: the model's)")
    p.add_argument("--langs", default=None, help="comma-separated languages of the embedded corpus")
    p.add_argument("--num-texts", type=int, default=None, help="texts per language")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--out", required=True, help="safetensors file for the reduced NeuronStats (written by rank 0)")
    args = p.parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        rank = dist.get_rank()
        device = "cpu"
        if backend == "nccl":
            import os
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = f"cuda:{torch.cuda.current_device()}"
        from xlkernels.models import load_default, load_model, tiny_model
        if args.tiny:
            model, tok = tiny_model(args.tiny)
            model = model.to(device)
        elif args.model:
            model, tok = load_model(args.model, device=device)
        else:
            model, tok = load_default(device=device)
        if args.tokenizer:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        langs = args.langs.split(",") if args.langs else None
        corpus = parallel_corpus(langs, args.num_texts)
        stats = collect_stats_distributed(xlkernels.patch(model), tok, corpus, args.batch_size, args.max_length,
                                          progress=True, packing=args.packing)
        if rank == 0:
            stats.save(args.out)
            print(f"wrote {args.out}: {list(corpus)} tokens {stats.tokens[0].tolist()}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
