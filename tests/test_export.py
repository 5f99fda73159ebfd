"""Export in the reference ReDrafter format reloads to identical logits (docs/design.md §2)."""

import json

import pytest
import torch
from safetensors import safe_open

from pipeline.drafter import build_drafter, make_arch
from pipeline.export import expected_tensors, export_drafter, load_exported


@pytest.mark.parametrize("exit_dim,rnn", [(0, True), (48, True), (0, False)])
def test_export_roundtrip(tmp_path, exit_dim, rnn):
    V, H = 96, 16
    embed = torch.randn(V, H)
    arch = make_arch(V, H, exit_dim=exit_dim, rnn=rnn, num_draft_layers=2, horizon=5)
    drafter = build_drafter(arch, embed, seed=1)
    with torch.no_grad():  # non-zero residual blocks so every tensor matters
        for p in drafter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export_drafter(drafter.state_dict(), arch, tmp_path / "drafter")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "recurrent_drafting_drafter"
    for key in ("vocab_size", "hidden_size", "exit_dim", "num_draft_layers", "num_lookback_tokens", "rnn"):
        assert key in config
    assert config["exit_dim"] == (exit_dim or 2 * H) and config["num_lookback_tokens"] == -1
    assert config["beam_length"] == 5 and config["redrafter_draft_len_per_beam"] == 4

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert shapes == expected_tensors(arch)
    assert dtypes == {torch.bfloat16}
    assert ("input_proj.weight" in shapes) == bool(exit_dim and exit_dim != 2 * H)
    assert ("rnn_w.weight" in shapes) == rnn
    assert "embed_VH" not in shapes  # the base model's embeddings are never saved

    # the reloaded drafter gives identical logits to the original rounded to the export dtype
    reference = build_drafter(arch, embed)
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in drafter.state_dict().items()})
    reloaded = load_exported(out, embed)
    h, toks = torch.randn(4, H), torch.randint(0, V, (4, 4))
    torch.testing.assert_close(reloaded(h, toks), reference(h, toks), rtol=0, atol=0)


def test_expected_names_match_spec_listing():
    arch = make_arch(100, 8, exit_dim=24, num_draft_layers=2)
    assert expected_tensors(arch) == {
        "lm_head.0.linear.weight": (24, 24), "lm_head.0.linear.bias": (24,),
        "lm_head.1.linear.weight": (24, 24), "lm_head.1.linear.bias": (24,),
        "lm_head.2.weight": (100, 24),
        "rnn_u.weight": (8, 8), "rnn_u.bias": (8,), "rnn_w.weight": (8, 8),
        "input_proj.weight": (24, 16), "input_proj.bias": (24,),
    }


def test_export_rejects_wrong_tensors(tmp_path):
    arch = make_arch(50, 8)
    state = build_drafter(arch, torch.randn(50, 8)).state_dict()
    state.pop("rnn_w.weight")
    with pytest.raises(ValueError, match="missing \\['rnn_w.weight'\\]"):
        export_drafter(state, arch, tmp_path / "x")


def test_drafter_rejects_mismatched_base_embeddings():
    with pytest.raises(ValueError, match="do not match"):
        build_drafter(make_arch(50, 8), torch.randn(60, 8))
