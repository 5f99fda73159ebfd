"""Which base models the pipeline handles, decided from config.json before any work, and the per-family
facts the decoder and the teacher need (docs/design.md §6, "Model families").

    check_support(config, allow_untested=False)   # raises ValueError naming the unsupported feature
    attention_windows(config)                     # per layer: None (full causal) or the sliding window
    output_logits(model, hidden)                  # the model's own logits from its last hidden state
    SCALED_EMBEDDINGS                             # families whose input embeddings are scaled by sqrt(H)

The tree-verify forward passes its own 4D masks and a static cache (eval/decoder.py), and the teacher
computes log-probs from the last hidden state. Both follow the model's own forward for:
- sliding-window and hybrid sliding/global attention (Mistral, Phi-3, Qwen2/3 with
  `use_sliding_window`, Gemma 2/3, gpt-oss): a sliding layer sees the keys whose position is within
  its window of the query's position, the rule transformers' own masks use; the decoder builds one mask
  per layer type and keeps every layer's cache at full length (slots are positions);
- final-logit soft-capping (Gemma 2): `output_logits` applies it exactly as the model's forward does;
  attention-logit soft-capping happens inside the model's attention, which we call, not re-implement.
Anything else that changes what a layer attends to is refused by name (chunked attention, linear or
state-space layers, shared KV, bidirectional attention, several window sizes), and a family the tests
do not cover (TESTED_FAMILIES, each with a test in tests/test_families.py) needs
`model.allow_untested=true`, after which the eval's token-for-token lossless check tells whether the
decoder handles it.
"""

from __future__ import annotations

import torch

TESTED = "tests/test_families.py"
TESTED_FAMILIES = {
    "llama": "Llama 2/3, SmolLM2 (tests/test_decoder.py, test_smollm2_e2e.py, " + TESTED + ")",
    "mistral": "Mistral: sliding window on every layer (" + TESTED + ")",
    "qwen2": "Qwen 2/2.5, with or without sliding-window layers (" + TESTED + ")",
    "qwen3": "Qwen 3, with or without sliding-window layers (" + TESTED + ")",
    "phi3": "Phi-3/Phi-4: sliding window on every layer (" + TESTED + ")",
    "gemma2": "Gemma 2: alternating sliding/global layers, attention and final-logit soft-capping, scaled "
              "embeddings (" + TESTED + ")",
    "gemma3_text": "Gemma 3 (text): hybrid sliding/global layers, scaled embeddings, local/global RoPE ("
                   + TESTED + ")",
    "gpt_oss": "gpt-oss: alternating sliding/global layers, attention sinks, mixture of experts (" + TESTED + ")",
}
ATTENTION_KINDS = {"full_attention", "sliding_attention"}
# Families (model_type) whose input embeddings are multiplied by sqrt(hidden_size) on the way into the
# decoder: a teacher replica split into stages (pipeline/stages.py, teacher.stages > 1) refuses them, since
# a later stage enters the decoder with hidden states, not token embeddings.
SCALED_EMBEDDINGS = ("gemma", "gemma2", "gemma3_text", "gemma3")


def _text(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _layer_layout(config) -> tuple[list[str], list[dict]]:
    """Layer types and their cache kwargs, as transformers' own caches lay them out (the same function
    StaticCache calls), so our masks and caches agree with the model's."""
    from transformers.cache_utils import get_layer_types_and_kwargs
    return get_layer_types_and_kwargs(_text(config))


def attention_windows(config) -> tuple[int | None, ...]:
    """Per decoder layer: None for full causal attention, w for a sliding window of w tokens (a query at
    position p sees the keys at positions p - w < k <= p, transformers' `sliding_window_overlay`)."""
    types, kwargs = _layer_layout(config)
    unknown = sorted(set(types) - ATTENTION_KINDS)
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported by the tree-verify decoder")
    return tuple(kw.get("sliding_window") if kind == "sliding_attention" else None for kind, kw in zip(types, kwargs))


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model's own forward computes from its last (post-norm) hidden state: the output
    embedding, then final-logit soft-capping (cap * tanh(logits / cap)) where the config has it."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(_text(model.config), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def unsupported_features(config) -> list[str]:
    """Features of this config that the decoder or the teacher does not implement."""
    text = _text(config)
    found = []
    types, kwargs = _layer_layout(config)
    unknown = sorted(set(types) - ATTENTION_KINDS)
    if unknown:
        found.append(f"layer types {unknown} (only full and sliding-window attention are handled)")
    windows = sorted({kw["sliding_window"] for kind, kw in zip(types, kwargs) if kind == "sliding_attention"})
    if len(windows) > 1:
        found.append(f"several sliding-window sizes {windows}")
    if getattr(text, "use_bidirectional_attention", False):
        found.append("use_bidirectional_attention=True (not a causal decoder)")
    if getattr(text, "kv_sharing_modes", None):
        found.append("KV sharing between layers (kv_sharing_modes)")
    return found


def check_support(config, allow_untested: bool = False) -> None:
    features = unsupported_features(config)
    family = getattr(config, "model_type", "?")
    if features:
        raise ValueError(f"base model family {family!r} uses " + "; ".join(features) + ": not supported by the "
                         "tree-verify decoder and teacher (they would fail or be wrong after the teacher and "
                         "train stages). Supported and tested: " + ", ".join(TESTED_FAMILIES) + ".")
    if family not in TESTED_FAMILIES and not allow_untested:
        raise ValueError(f"base model family {family!r} is not covered by draftforge's tests (tested: "
                         + "; ".join(f"{k}: {v}" for k, v in TESTED_FAMILIES.items()) + "). Set "
                         "model.allow_untested=true to run it anyway; the eval's token-for-token check against "
                         "plain greedy decoding then says whether the decoder handles it.")
