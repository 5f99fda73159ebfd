"""What a serving team receives (pipeline/handoff.py): the model card with the right converter flags, the
serving config, and `python -m pipeline.export --check`, which passes on a sound export and names each
problem of a damaged or mismatched one.

    python -m pytest tests/test_handoff.py -q
"""

from __future__ import annotations

import json
import shutil

import torch

from pipeline.base_model import base_model_fingerprint, input_embeddings, load_base_model
from pipeline.config import ModelConfig
from pipeline.drafter import build_drafter, make_arch
from pipeline.export import export_drafter, main as export_main
from pipeline.handoff import check_export, write_handoff

W, L = 2, 3


def _record():
    method = {"tokens_per_step": 1.8, "tokens_per_s": 30.0, "speedup": 1.4, "speedup_ci95": 0.05}
    return {"num_prompts": 4, "max_new_tokens": 16, "device": "cpu", "dtype": "float32", "batch_size": 1,
            "beam_width": W, "beam_length": L, "repeats": 2, "temperature": 0.0, "lossless": True,
            "lossless_exact": True, "tokens_per_step": 1.8, "speedup": 1.4, "speedup_ci95": 0.05,
            "methods": {"plain": {**method, "tokens_per_step": 1.0, "speedup": 1.0},
                        "redrafter": {**method, "by_category": {"code": {"tokens_per_step": 1.8, "speedup": 1.4}}}}}


def _export(tiny_model_dir, out, draft_vocab_size=0):
    model, _ = load_base_model(ModelConfig(base_model=str(tiny_model_dir)))
    cfg = model.config
    arch = make_arch(cfg.vocab_size, cfg.hidden_size, exit_dim=48, draft_vocab_size=draft_vocab_size)
    d2t = torch.arange(draft_vocab_size) if draft_vocab_size else None
    drafter = build_drafter(arch, input_embeddings(model), seed=0, d2t=d2t)
    export_drafter(drafter.state_dict(), arch, out / "drafter")
    lineage = {"base_model": str(tiny_model_dir),
               "base_model_hash": base_model_fingerprint(ModelConfig(base_model=str(tiny_model_dir)))}
    decision = {"promoted": True, "reason": "all rules passed"}
    data = {"num_sequences": 10, "num_tokens": 400, "responses": "generate", "recipe": {"model_dtype": "bfloat16"},
            "prompt_accounting": {"sources": {"train.jsonl": {"considered": 12, "kept": 10, "skipped": {"too_long": 2}}},
                                  "overlaps_eval_removed": 0}}
    write_handoff(out, _record(), arch, decision, lineage, data)
    return arch


def test_card_and_serving_config_carry_the_beam_settings(tiny_model_dir, tmp_path):
    arch = _export(tiny_model_dir, tmp_path / "promoted")
    card = (tmp_path / "promoted" / "README.md").read_text()
    assert f"--redrafter_num_beams {W} --redrafter_draft_len_per_beam {L - 1}" in card
    assert f"--beam_width {W} --beam_length {L}" in card  # Apple's reference counts g0
    assert "| code | 1.80 | 1.40x |" in card and "PROMOTED" in card and "too_long 2" in card
    assert "computed in bfloat16" in card  # the teacher's dtype, which may differ from the eval's (float32 here)
    assert "explicit_draft_tokens" in card and "TensorRT engine backend" in card
    serving = json.loads((tmp_path / "promoted" / "serving.json").read_text())
    assert serving["redrafter_num_beams"] == W and serving["redrafter_draft_len_per_beam"] == L - 1
    assert serving["trained_draft_len_per_beam"] == arch.horizon - 1 and serving["max_batch_size_where_faster"] == 1


def test_draft_vocab_card_says_which_loaders_refuse_it(tiny_model_dir, tmp_path):
    _export(tiny_model_dir, tmp_path / "candidate", draft_vocab_size=64)
    card = (tmp_path / "candidate" / "README.md").read_text()
    assert "draft-vocabulary extension" in card and "do NOT accept it" in card
    assert "convert_checkpoint.py" not in card  # no command that would fail


def test_check_passes_on_a_sound_export_and_names_each_problem(tiny_model_dir, tmp_path, capsys):
    from tests.conftest import build_tiny_model

    good = tmp_path / "promoted"
    _export(tiny_model_dir, good)
    assert check_export(good, str(tiny_model_dir)) == []
    assert export_main(["--check", str(good), "--base-model", str(tiny_model_dir)]) == 0
    assert "OK:" in capsys.readouterr().out

    damaged = tmp_path / "damaged"
    shutil.copytree(good, damaged)
    weights = damaged / "drafter" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert any("model.safetensors: sha256 does not match" in p for p in check_export(damaged, str(tiny_model_dir)))

    too_long = tmp_path / "too_long"
    shutil.copytree(good, too_long)
    serving = json.loads((too_long / "serving.json").read_text())
    serving["redrafter_draft_len_per_beam"] = 9
    (too_long / "serving.json").write_text(json.dumps(serving))
    assert any("asks for 9 drafts per beam" in p for p in check_export(too_long, str(tiny_model_dir)))

    other = build_tiny_model(tmp_path / "other_base", seed=1)  # same sizes, other weights
    problems = check_export(good, str(other))
    assert len(problems) == 1 and "trained for base model hash" in problems[0]
    assert export_main(["--check", str(good), "--base-model", str(other)]) == 1
    assert "FAIL: the drafter was trained for base model hash" in capsys.readouterr().err

    wider = build_tiny_model(tmp_path / "wider_base", hidden_size=48)
    assert any("hidden_size=32 but the base model has 48" in p for p in check_export(good, str(wider)))


def test_check_of_a_missing_export_is_a_clear_failure(tmp_path, tiny_model_dir):
    assert check_export(tmp_path, str(tiny_model_dir)) == [f"{tmp_path / 'config.json'}: missing"]
