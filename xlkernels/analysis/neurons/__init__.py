"""FFN neurons: per-language statistics over a corpus (stats, distributed), LAPE and the ternary classes
(select), switching a language's neurons off (deactivation) and forcing them on (forcing)."""
from .select import (LapeResult, NeuronClasses, activation_probs, appear_histogram, as_layer_dict,  # noqa: F401
                     classify, lape, lape_entropy, lna_assign, lna_score, load_neuron_sets, neuron_sets_tensors,
                     sweep_lambda)
from .stats import bucketed_batches, collect_stats, packed_batches, text_batches  # noqa: F401
