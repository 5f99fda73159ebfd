"""The resource plan (`--plan`, pipeline/resources.py) from config.json alone, checked number by number
against hand calculations for the published Llama-3.1-8B and -70B dimensions under the llama8b and
llama70b recipes.

    python -m pytest tests/test_resources.py -q
"""

from __future__ import annotations

import json
import math

import pytest

import pipeline.main as pm
from pipeline.config import ModelConfig, load_config
from pipeline.resources import load_model_config, resource_plan

# published dimensions (config.json of meta-llama/Llama-3.1-{8B,70B}-Instruct)
LLAMA = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
}


def write_config(path, dims):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128009, **dims}))
    return path


def hand_parameters(d) -> int:
    H, I, n, h, kv, V = (d[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "vocab_size"))
    hd = H // h
    per_layer = H * h * hd + 2 * H * kv * hd + h * hd * H + 3 * H * I + 2 * H  # q, k+v, o, gate/up/down, 2 norms
    return V * H + n * per_layer + H + V * H  # embeddings, layers, final norm, untied lm_head


@pytest.mark.parametrize("size,published", [("8b", 8_030_261_248), ("70b", 70_553_706_496)])
def test_plan_matches_hand_calculation(size, published, tmp_path):
    d = LLAMA[size]
    model_dir = write_config(tmp_path / size, d)
    cfg = load_config([f"recipe=llama{size}", f"model.base_model={model_dir}", "drafter.draft_vocab_size=0"])
    n = resource_plan(cfg, load_model_config(cfg.model)).numbers
    H, V, L, kv = d["hidden_size"], d["vocab_size"], d["num_hidden_layers"], d["num_key_value_heads"]
    hd = H // d["num_attention_heads"]
    t, tr, ev, r = cfg.teacher, cfg.train, cfg.eval, cfg.resources

    P = hand_parameters(d)
    assert P == published == n["base_parameters"]  # 8.03 B and 70.55 B, the published counts
    assert n["base_weight_bytes"] == 2 * P  # bf16
    kv_token = 2 * L * kv * hd * 2
    assert n["kv_bytes_per_token"] == kv_token  # 128 KiB (8B), 320 KiB (70B)
    kv_batch = kv_token * t.batch_size * (cfg.data.max_prompt_tokens + t.max_new_tokens)
    assert n["teacher_kv_bytes"] == kv_batch
    assert n["teacher_gpus_needed"] == math.ceil((2 * P + kv_batch) / (80e9 * 0.8))
    assert n["teacher_gpus_needed"] == {"8b": 1, "70b": 3}[size]  # 70B: 141.1 + 32.2 GB over 64 GB usable
    assert n["teacher_tokens"] == cfg.data.train.limit * t.max_new_tokens
    per_token = H * 2 + 4 + 64 * 4 + 64 * 4 + 4  # bf16 hidden (2 bytes), top-64 ids + log-probs, token, tail
    assert n["teacher_bytes_per_token"] == per_token and n["teacher_bytes"] == per_token * n["teacher_tokens"]

    D = 2 * H  # exit_dim 0 = the reference's 2H
    drafter = (2 * H * H + H) + 2 * (D * D + D) + D * V
    assert n["drafter_parameters"] == drafter  # 1.22 B (8B): the full-vocabulary head dominates
    w = tr.num_workers
    share = {2: 2 + (2 + 12) / w, 3: (2 + 2 + 12) / w}[tr.zero_stage]
    assert n["train_state_bytes_per_gpu"] == pytest.approx(drafter * share)
    assert n["train_embedding_bytes"] == V * H * 2
    acts = tr.batch_size * (t.max_new_tokens + 1) * 4 * (V * 4 * 3 + D * 4 * 6)
    assert n["train_activation_bytes"] == acts
    assert n["checkpoint_bytes"] == drafter * 14 and n["export_bytes"] == drafter * 2
    assert n["teacher_hours"] == pytest.approx(n["teacher_tokens"] / (r.teacher_tokens_per_s * t.num_actors) / 3600)
    assert n["train_hours"] == pytest.approx(tr.epochs * n["teacher_tokens"] / (r.train_tokens_per_s * w) / 3600)
    assert n["eval_hours"] == pytest.approx(4 * ev.repeats * 80 * ev.max_new_tokens / r.eval_tokens_per_s / 3600)


def test_plan_command_prints_without_weights_and_flags_what_does_not_fit(tmp_path, capsys):
    model_dir = write_config(tmp_path / "70b", LLAMA["70b"])
    assert pm.main(["recipe=llama70b", f"model.base_model={model_dir}", "drafter.draft_vocab_size=0",
                    "--plan"]) == 0
    out = capsys.readouterr().out
    assert "base parameters       70.554 B = 141.1 GB at bfloat16" in out
    assert "-> 3 GPU(s) of 80 GB with 20% headroom; recipe: 4 per replica (fits)" in out
    assert "WARNING" in out and "draft vocabulary" in out  # a 128k-row head at micro-batch 8 does not fit
    assert "assumptions" in out and "teacher_tokens_per_s" in out
    # the default (auto) gives a 128k-vocabulary model a 32k draft vocabulary
    model_dir = write_config(tmp_path / "8b-dv", LLAMA["8b"])
    assert pm.main(["recipe=llama8b", f"model.base_model={model_dir}", "train.batch_size=2", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "output rows 32768 = draft vocabulary" in out and "WARNING" not in out
    # a replica split into pipeline stages counts the GPUs of all its stage actors
    assert pm.main(["recipe=llama70b", f"model.base_model={tmp_path / '70b'}", "teacher.stages=2",
                    "teacher.gpus_per_actor=1", "teacher.num_actors=4", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "recipe: 2 per replica = 2 pipeline stages x 1 (TOO FEW: raise teacher.gpus_per_actor or teacher.stages)" in out
    assert "teacher replicas      4 (8 GPUs)" in out


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json for model.base_model='no-such/model'.*huggingface-cli download"):
        load_model_config(ModelConfig(base_model="no-such/model"))
    with pytest.raises(ValueError, match="that directory has no config.json"):
        load_model_config(ModelConfig(base_model=str(tmp_path)))
