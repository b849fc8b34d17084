"""One module per op: torch.library registration, fake (meta) impls, autograd, and the public function.
Backends are chosen by xlkernels.backends.select."""
