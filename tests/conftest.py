"""Shared test fixtures: a tiny random Llama base model with its own byte-level BPE tokenizer.

`tiny_model_dir` is built once per test session (a second or two on CPU) and saved with
`save_pretrained`, so every stage loads it exactly like a real base model directory.

`ray_local` is one local Ray cluster shared by the test modules that drive Ray in this process
(test_stages, test_teacher, test_train): each `ray.init` + `ray.shutdown` costs 5-10 s.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), and every
# state change of a run waits for a poll: starting the worker group, each checkpoint, the end. On the
# tests' short runs that was a third of each training run (26 s -> 17 s at 0.5 s). Set here, it reaches
# every cluster the tests start (in-process, `python -m pipeline.main` subprocesses, `ray start`); Ray
# Train propagates it from the driver to its controller and workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

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


def _uses(item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


@pytest.fixture(scope="module")
def ray_local(request):
    """A local Ray cluster (2 CPUs, workers' output to the driver, this repo importable in every worker).
    One cluster serves every module that asks for it: started by the first, kept running until the end
    of the last one in this session (a test that needs no cluster in this process asks for `ray_free`)."""
    import ray

    from pipeline.main import start_local_ray

    if not ray.is_initialized():
        # address="local": a new cluster of its own, never a `ray start` one that a test beside it runs
        start_local_ray(lambda port: dict(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
                                          runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}))
    yield
    items = request.session.items
    mine = [i for i, item in enumerate(items) if item.module is request.module]
    if not any(_uses(item, "ray_local") for item in items[max(mine, default=len(items)) + 1:]):
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_free():
    """No Ray cluster connected in this process, for modules that run `pipeline.main` in-process (it starts
    its own cluster) or check that a refusal came before Ray started: shuts down a `ray_local` one that an
    earlier module left running for a later one (only when the modules run in another order than the files')."""
    import sys

    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()
    yield
