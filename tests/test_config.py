"""Recipes validate against the typed schema; bad input fails early with every problem listed."""

import pytest

from pipeline.config import Config, ConfigError, available_recipes, load_config, to_yaml
from pipeline.main import main


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_validates(recipe):
    cfg = load_config([f"recipe={recipe}"])
    assert isinstance(cfg, Config)
    assert cfg.run.name == recipe
    assert (cfg.eval.beam_length >= 2 or cfg.eval.beam_length == 0) and cfg.teacher.top_k > 0  # 0: auto


def test_expected_recipes_exist():
    assert {"tiny", "llama8b", "llama70b"} <= set(available_recipes())


def test_real_recipes_name_hub_models():
    assert load_config(["recipe=llama70b"]).model.base_model == "meta-llama/Llama-3.1-70B-Instruct"
    assert load_config(["recipe=llama8b"]).model.base_model == "meta-llama/Llama-3.1-8B-Instruct"


def test_overrides_merge_after_recipe():
    cfg = load_config(["recipe=tiny", "train.lr=0.5", "eval.beam_width=3", "run.stages=[teacher]"])
    assert cfg.train.lr == 0.5 and cfg.eval.beam_width == 3 and cfg.run.stages == ["teacher"]
    assert cfg.teacher.num_actors == 2  # from the tiny recipe, over base's default


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(["recipe=tiny", "train.lrr=1"])
    msg = str(e.value)
    assert "unknown key 'train.lrr'" in msg and "lr, weight_decay" in msg


def test_bad_value_is_named():
    with pytest.raises(ConfigError) as e:
        load_config(["recipe=tiny", "eval.beam_width=abc"])
    assert "eval.beam_width" in str(e.value) and "abc" in str(e.value)


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(["recipe=tiny", "train.lrr=1", "eval.beam_width=abc", "nosuch.key=1"])
    assert len(e.value.problems) == 3


def test_range_and_choice_problems():
    with pytest.raises(ConfigError) as e:
        load_config(["recipe=tiny", "eval.device=tpu", "teacher.top_k=0", "eval.beam_length=1"])
    assert len(e.value.problems) == 3
    assert "choose one of cpu, cuda" in str(e.value)


def test_hybrid_settings_are_checked_together():
    with pytest.raises(ConfigError) as e:
        load_config(["recipe=tiny", "eval.hybrid_switch=4", "eval.hybrid_lookup_length=1"])
    assert len(e.value.problems) == 2
    assert "eval.hybrid_switch" in str(e.value) and "'eval.hybrid_lookup_length': 1" in str(e.value)
    with pytest.raises(ConfigError, match="set eval.hybrid_switch"):
        load_config(["recipe=tiny", "eval.hybrid_switch=0", "eval.hybrid_lookup_length=10"])
    assert load_config(["recipe=tiny", "eval.hybrid_switch=2", "eval.hybrid_lookup_length=10"]).eval.hybrid_lookup_length == 10


def test_auto_beam_length_needs_one_greedy_beam():
    assert load_config(["recipe=tiny", "eval.beam_width=1", "eval.beam_length=0"]).eval.beam_length == 0
    with pytest.raises(ConfigError, match="needs eval.beam_width=1"):
        load_config(["recipe=tiny", "eval.beam_width=2", "eval.beam_length=0"])
    with pytest.raises(ConfigError, match="or 0 \\(auto\\)"):
        load_config(["recipe=tiny", "eval.beam_length=1"])


def test_max_turn_is_checked():
    with pytest.raises(ConfigError, match="'data.train.max_turn': -1"):
        load_config(["recipe=smollm2", "data.train.max_turn=-1"])
    with pytest.raises(ConfigError, match="'data.eval.max_turn' applies to the sharegpt corpus"):
        load_config(["recipe=smollm2", "data.eval.max_turn=1"])
    assert load_config(["recipe=smollm2", "data.train.max_turn=2"]).data.train.max_turn == 2


def test_auto_dtype_is_resolved_from_the_machine(monkeypatch):
    import torch

    from pipeline import config

    # this machine's answer, from torch's own CPU probe: the resolved config holds the concrete dtype
    caps = torch.cpu.get_capabilities()
    native = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else bool(
        caps.get("amx_bf16") or (caps.get("avx512_bf16") and "GenuineIntel" not in open("/proc/cpuinfo").read()))
    assert config.native_bf16() is native
    # Intel without AMX: avx512_bf16 alone measured slower than float32 (pipeline/config.py native_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512_bf16, amx, vendor, found in ((True, False, "GenuineIntel", False), (True, False, "AuthenticAMD", True),
                                            (True, True, "GenuineIntel", True), (False, False, "AuthenticAMD", False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda a=avx512_bf16, b=amx: {"avx512_bf16": a, "amx_bf16": b})
        monkeypatch.setattr(config, "cpu_vendor", lambda vendor=vendor: vendor)
        assert config.native_bf16() is found, (avx512_bf16, amx, vendor)
    monkeypatch.undo()
    cfg = load_config(["recipe=smollm2"])
    assert (cfg.model.dtype, cfg.train.precision) == (("bfloat16", "bf16") if native else ("float32", "fp32"))
    # both branches, whatever this machine is; an explicit dtype is kept
    for found, dtype, precision in ((True, "bfloat16", "bf16"), (False, "float32", "fp32")):
        monkeypatch.setattr(config, "native_bf16", lambda found=found: found)
        cfg = load_config(["recipe=smollm2"])
        assert (cfg.model.dtype, cfg.train.precision) == (dtype, precision)
        cfg = load_config(["recipe=smollm2", "model.dtype=float32", "train.precision=bf16"])
        assert (cfg.model.dtype, cfg.train.precision) == ("float32", "bf16")
    with pytest.raises(ConfigError, match="'model.dtype': 'fp8'"):
        load_config(["recipe=smollm2", "model.dtype=fp8"])


def test_unknown_recipe_lists_recipes():
    with pytest.raises(ConfigError, match="available recipes: .*tiny"):
        load_config(["recipe=nope"])


def test_cli_reports_config_error_and_exit_code(capsys):
    assert main(["recipe=tiny", "train.lrr=1"]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err


def test_print_config_runs_nothing(capsys, tmp_path):
    assert main(["recipe=tiny", f"run.output_dir={tmp_path}", "--print-config"]) == 0
    out = capsys.readouterr().out
    beam_width = load_config(["recipe=tiny"]).eval.beam_width
    assert f"beam_width: {beam_width}" in out and not any(tmp_path.iterdir())
    assert to_yaml(load_config(["recipe=tiny", f"run.output_dir={tmp_path}"])) in out


def test_draft_vocabulary_is_auto_by_default_and_resolves_by_vocabulary_size():
    """-1 (auto): a 32k draft vocabulary above 64k base tokens (Llama 3, Qwen, Gemma), the full vocabulary
    below; explicit values are kept. The train stage hashes the resolved value, so `auto` and its value
    are the same run (a run made with an explicit 0 on a small model is still reused)."""
    from pipeline.config import DrafterConfig, resolve_drafter
    from pipeline.train import train_inputs

    auto = DrafterConfig()
    assert auto.draft_vocab_size == -1
    assert resolve_drafter(auto, 49_152).draft_vocab_size == 0
    assert resolve_drafter(auto, 128_256).draft_vocab_size == 32_768
    assert resolve_drafter(DrafterConfig(draft_vocab_size=8192), 262_144).draft_vocab_size == 8192
    assert resolve_drafter(DrafterConfig(draft_vocab_size=0), 262_144).draft_vocab_size == 0
    cfg = load_config(["recipe=tiny"])
    manifest = {"vocab_size": 300, "hidden_size": 32}
    assert train_inputs(manifest, resolve_drafter(auto, 300), cfg.train, 0) == \
        train_inputs(manifest, DrafterConfig(draft_vocab_size=0), cfg.train, 0)
    assert main(["recipe=tiny", "drafter.draft_vocab_size=-2"]) == 2


@pytest.mark.parametrize("recipe", ["../recipes/tiny", "/etc/passwd", "tiny.yaml", "sub/tiny"])
def test_a_recipe_is_a_name_not_a_path(recipe):
    with pytest.raises(ConfigError, match="a recipe is a name in recipes/"):
        load_config([f"recipe={recipe}"])


def test_settings_added_later_hash_as_absent_only_at_their_old_behaviour():
    """One rule for every setting added after work was recorded (config.ADDED_LATER): at the value that
    behaves as before it is left out of the hash (old teacher data and eval records stay valid); any other
    value is hashed, so work made with it is never mistaken for the old."""
    import dataclasses

    from pipeline.config import ADDED_LATER, DrafterConfig, EvalConfig, PromptSource, TeacherConfig, TrainConfig
    from pipeline.lineage import hash_json, hashed_settings

    assert set(ADDED_LATER) == {"teacher", "eval", "drafter", "data", "train"}
    for section, cls in (("teacher", TeacherConfig), ("eval", EvalConfig), ("drafter", DrafterConfig),
                         ("data", PromptSource), ("train", TrainConfig)):
        defaults = dataclasses.asdict(cls())
        for key, old in ADDED_LATER[section].items():
            assert key in defaults, f"{section}.{key} is not a setting"
            at_old = hashed_settings({**defaults, key: old}, ADDED_LATER[section])
            assert key not in at_old
            other = {"responses": "corpus", "engine": "other", "hybrid_ngram": 3, "hybrid_switch": 2, "head": "medusa",
                     "static_step": "on", "hybrid_lookup_length": 10, "max_turn": 1, "cpu_kernels": "onednn",
                     "init": "base_head", "anchors": "on_policy"}[key]
            changed = hashed_settings({**defaults, key: other}, ADDED_LATER[section])
            assert changed[key] == other and hash_json(changed) != hash_json(at_old)
