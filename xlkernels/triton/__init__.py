"""Triton kernels. Under TRITON_INTERPRET=1 they run on CPU tensors (used by the tests)."""
