"""Pure-PyTorch reference implementations (float64-capable): the ground truth for tests."""
