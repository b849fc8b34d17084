"""Tiny random-init models (2 layers, hidden 64, 4 heads / 2 KV heads, head_dim 16) of each supported
architecture, plus a byte-level tokenizer built locally. For tests and CLI smoke runs; no downloads."""
import torch

# arch -> (model_type, extra config). Sliding windows are tiny (4) so window masking shows up in tests.
ARCHS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 4}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "gemma2": ("gemma2", {"sliding_window": 4, "query_pre_attn_scalar": 16,
                          "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma3": ("gemma3_text", {"sliding_window": 4, "query_pre_attn_scalar": 16,
                               "layer_types": ["sliding_attention", "full_attention"]}),
    "cohere": ("cohere", {}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
}
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")   # ids 0..3; bytes follow


def tiny_tokenizer(padding_side="left"):
    """Byte-level tokenizer: 4 specials + one token per byte (260 ids). Handles any UTF-8 text, adds <bos>,
    pads with <pad> (left by default) and decodes back to the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side=padding_side)


def tiny_config(arch="llama", vocab=None, **overrides):
    from transformers import AutoConfig
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    model_type, extra = ARCHS[arch]
    n_tok = len(SPECIALS) + 256
    vocab = n_tok if vocab is None else int(vocab)
    if vocab < n_tok:
        raise ValueError(f"vocab must be >= {n_tok} (the tiny tokenizer's size), got {vocab}")
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
              initializer_range=0.15, attn_implementation="eager")
    kw.update(extra)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(arch="llama", seed=0, vocab=None, dtype=torch.float32, **overrides):
    """(model, tokenizer): a random tiny `arch` model (eval mode, eager attention) and tiny_tokenizer().

    Deterministic for a given seed; does not disturb the global RNG. `overrides` go to the config.
    """
    from transformers import AutoModelForCausalLM
    config = tiny_config(arch, vocab, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model.to(dtype).eval(), tiny_tokenizer()
