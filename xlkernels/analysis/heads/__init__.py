"""Attention heads: LAHIS importance scores and head sets (lahis), the trainable soft head mask (soft_mask)."""
from .lahis import (MODES, LahisAccumulator, decoder_layers, effective_min_rep, flat_id, head_sets,  # noqa: F401
                    lahis_scores, lahis_scores_hooked, o_proj_mask, top_heads, top_k_heads, unflat)
