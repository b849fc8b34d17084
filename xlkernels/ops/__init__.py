"""One module per op: torch.library registration, fake (meta) impls, autograd, and the public function.
Backends are chosen by xlkernels.backends.select."""

from .._ext import load as _load_ext

_load_ext()  # op modules test hasattr(torch.ops.xlkernels, ...) at import: load (or compile) _C first
