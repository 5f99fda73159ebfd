"""Which base models the pipeline is known to handle, decided from config.json before any work.

    check_support(config, allow_untested=False)   # raises ValueError naming the unsupported feature

The tree-verify forward passes ONE custom 4D mask and a static cache (eval/decoder.py, docs/design.md
§6), and the teacher computes log-probs as lm_head(hidden). A model whose forward does something else
would fail or, worse, be silently wrong, after hours of teacher and training work. So:
- a feature the decoder or teacher does not implement is refused, by name: sliding-window or hybrid
  sliding/global attention (per-layer-type masks and caches), attention-logit and final-logit
  soft-capping;
- a family the tests do not cover (TESTED_FAMILIES) is refused unless `model.allow_untested=true`, which
  runs it anyway (the eval's token-for-token lossless check then tells whether it works).
"""

from __future__ import annotations

TESTED_FAMILIES = {"llama": "Llama 2/3, SmolLM2, the tiny test models (tests/test_decoder.py, test_smollm2_e2e.py)"}


def unsupported_features(config) -> list[str]:
    """Features of this config that the decoder or the teacher does not implement."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = []
    layer_types = getattr(text, "layer_types", None) or []
    window = getattr(text, "sliding_window", None)
    uses_window = window is not None and getattr(text, "use_sliding_window", True) is not False
    if any("sliding" in str(t) for t in layer_types) or (uses_window and not layer_types):
        found.append(f"sliding-window attention (sliding_window={window}"
                     + (f", layer_types {sorted(set(map(str, layer_types)))}" if layer_types else "") + ")")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(text, key, None):
            found.append(f"{key}={getattr(text, key)}")
    return found


def check_support(config, allow_untested: bool = False) -> None:
    features = unsupported_features(config)
    family = getattr(config, "model_type", "?")
    if features:
        raise ValueError(f"base model family {family!r} uses " + "; ".join(features) + ": not supported by the "
                         "tree-verify decoder and teacher yet (they would fail or be wrong after the teacher and "
                         "train stages). Supported and tested: " + ", ".join(TESTED_FAMILIES) + ".")
    if family not in TESTED_FAMILIES and not allow_untested:
        raise ValueError(f"base model family {family!r} is not covered by draftforge's tests (tested: "
                         + "; ".join(f"{k}: {v}" for k, v in TESTED_FAMILIES.items()) + "). Set "
                         "model.allow_untested=true to run it anyway; the eval's token-for-token check against "
                         "plain greedy decoding then says whether the decoder handles it.")
