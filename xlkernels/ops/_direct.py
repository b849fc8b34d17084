"""Calling an op whose autograd torch.library registered in Python (register_autograd) straight to its kernel
when no gradient can flow. That Python layer cost about 60 us per call inside a CPU model forward (cold caches;
bench/NOTES.md), more than the kernels themselves at decode sizes. Under torch.compile the op is called as is."""
import torch


def call(op, args: tuple, grad_inputs: tuple):
    """op(*args), below the autograd dispatch key unless a tensor of grad_inputs requires grad (with grad on)."""
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
