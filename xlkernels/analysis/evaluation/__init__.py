"""Does a steering plan work? Batched generation (generation), language ID of outputs (langid), the evaluation
harness behind `xlkernels eval` (evaluate), plan fitting per method (fit) and its report (report)."""
