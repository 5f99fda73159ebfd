"""The support check (pipeline/support.py): from config.json alone, before any work, a base model is either
a tested family without unsupported features, or refused with the feature named.

    python -m pytest tests/test_support.py -q
"""

from __future__ import annotations

import pytest
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from pipeline.support import check_support, unsupported_features


def test_llama_is_supported():
    check_support(LlamaConfig())
    assert unsupported_features(LlamaConfig()) == []


def test_sliding_window_is_refused_by_name():
    with pytest.raises(ValueError, match="'mistral' uses sliding-window attention \\(sliding_window=4096"):
        check_support(MistralConfig(sliding_window=4096), allow_untested=True)


def test_soft_capping_and_hybrid_attention_are_refused():
    config = Gemma2Config()
    features = unsupported_features(config)
    assert any(f.startswith("sliding-window attention") for f in features)
    assert "final_logit_softcapping=30.0" in features and "attn_logit_softcapping=50.0" in features
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_support(config, allow_untested=True)


def test_untested_family_needs_an_explicit_opt_in():
    config = Qwen2Config(use_sliding_window=False)
    assert unsupported_features(config) == []  # Qwen2 configs carry sliding_window but do not use it
    with pytest.raises(ValueError, match="'qwen2' is not covered.*model.allow_untested=true"):
        check_support(config)
    check_support(config, allow_untested=True)


def test_pipeline_refuses_before_any_work(tmp_path, capsys):
    import pipeline.main as pm

    model_dir = tmp_path / "mistral"
    MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, sliding_window=16).save_pretrained(model_dir)
    assert pm.main(["recipe=tiny", f"model.base_model={model_dir}", f"run.output_dir={tmp_path}"]) == 2
    assert "sliding-window attention" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()
