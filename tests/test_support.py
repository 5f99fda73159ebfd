"""The support check (pipeline/support.py): from config.json alone, before any work, a base model is either
a tested family without unsupported features, or refused with the feature named.

    python -m pytest tests/test_support.py -q
"""

from __future__ import annotations

import pytest
from transformers import (Gemma2Config, Gemma3TextConfig, Llama4TextConfig, LlamaConfig, MistralConfig, OlmoConfig,
                          Qwen2Config, Qwen3NextConfig)

from pipeline.support import SCALED_EMBEDDINGS, TESTED_FAMILIES, check_support, unsupported_features


def test_llama_is_supported():
    check_support(LlamaConfig())
    assert unsupported_features(LlamaConfig()) == []


def test_sliding_windows_and_soft_capping_are_supported():
    """Decoded, taught and trained per family in tests/test_families.py."""
    for config in (MistralConfig(sliding_window=4096), Gemma2Config(), Qwen2Config(use_sliding_window=True)):
        assert unsupported_features(config) == []
        check_support(config)


def test_features_the_decoder_does_not_implement_are_refused_by_name():
    with pytest.raises(ValueError, match="'llama4_text' uses layer types \\['chunked_attention'\\]"):
        check_support(Llama4TextConfig(), allow_untested=True)
    with pytest.raises(ValueError, match="'qwen3_next' uses layer types \\['linear_attention'\\]"):
        check_support(Qwen3NextConfig(), allow_untested=True)
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        check_support(Gemma3TextConfig(use_bidirectional_attention=True), allow_untested=True)


def test_untested_family_needs_an_explicit_opt_in():
    config = OlmoConfig()
    assert unsupported_features(config) == []
    with pytest.raises(ValueError, match="'olmo' is not covered.*model.allow_untested=true"):
        check_support(config)
    check_support(config, allow_untested=True)


def test_pipeline_refuses_before_any_work(tmp_path, capsys):
    import pipeline.main as pm

    model_dir = tmp_path / "gemma3"
    Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, use_bidirectional_attention=True).save_pretrained(model_dir)
    assert pm.main(["recipe=tiny", f"model.base_model={model_dir}", f"run.output_dir={tmp_path}"]) == 2
    assert "use_bidirectional_attention=True" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()


def test_scaled_embeddings_are_the_tested_families_whose_embeddings_transformers_scales():
    """SCALED_EMBEDDINGS, the per-family fact the split teacher (pipeline/stages.py) refuses by: for every
    tested family it says what the family's own embedding layer does, and a split replica refuses exactly
    the families it names."""
    from pipeline.stages import stage_problems
    from tests.test_families import family_model

    scaled = {name for name in TESTED_FAMILIES
              if float(getattr(family_model(name).get_input_embeddings(), "embed_scale", 1.0)) != 1.0}
    assert scaled == set(SCALED_EMBEDDINGS) & set(TESTED_FAMILIES) == {"gemma2", "gemma3_text"}
    for config in (LlamaConfig(), Gemma2Config(), Gemma3TextConfig()):
        refused = [p for p in stage_problems(2, config) if "scales its input embeddings" in p]
        assert bool(refused) == (config.model_type in SCALED_EMBEDDINGS), config.model_type
