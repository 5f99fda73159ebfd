"""Shared test fixtures: a tiny random Llama base model with its own byte-level BPE tokenizer.

`tiny_model_dir` is built once per test session (a second or two on CPU) and saved with
`save_pretrained`, so every stage loads it exactly like a real base model directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

EOS = "<|endoftext|>"
TOKENIZER_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "The quick brown fox jumps over the lazy dog.",
] * 4


def build_tiny_model(out_dir: Path, vocab_size: int = 300, hidden_size: int = 32, num_layers: int = 2,
                     seed: int = 0, config_class: str = "LlamaConfig", **config_extra) -> Path:
    """Train a ByteLevel BPE tokenizer on TOKENIZER_TEXTS, build a random model over its vocabulary
    (LlamaForCausalLM, or the causal LM of `config_class` with `config_extra`: tests/test_families.py)
    and save both into `out_dir` (fp32 weights)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TOKENIZER_TEXTS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                        model_max_length=512)
    eos_id = tokenizer.eos_token_id
    config = getattr(transformers, config_class)(**{
        "vocab_size": len(tokenizer), "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "tie_word_embeddings": True, "bos_token_id": eos_id, "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "initializer_range": 0.1,  # wider than the default so greedy argmaxes are not near-ties
        **config_extra,
    })
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Directory with config.json, model.safetensors and the tokenizer of a ~50k-parameter random Llama."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
