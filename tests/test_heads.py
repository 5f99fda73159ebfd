"""The draft head seam (pipeline/heads.py): every stage reaches the drafter through its head type."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.drafter import make_arch
from pipeline.heads import HEAD_TYPES, arch_record, head_of, head_type, read_arch


def test_redrafter_is_the_head_type_and_unknown_ones_are_refused():
    assert HEAD_TYPES == ("redrafter",)
    with pytest.raises(ValueError, match="unknown draft head 'medusa'; head types are redrafter"):
        head_type("medusa")
    with pytest.raises(ConfigError, match="bad value for 'drafter.head': 'medusa'"):
        load_config(["recipe=tiny", "drafter.head=medusa"])


def test_arch_json_records_the_head_and_old_records_read_as_redrafter():
    head = head_type("redrafter")
    arch = make_arch(64, 8, exit_dim=12, draft_vocab_size=16)
    record = json.loads(json.dumps(arch_record(head, arch)))
    assert record["head"] == "redrafter" and read_arch(record) == (head, arch)
    old = {k: v for k, v in record.items() if k != "head"}  # a drafter trained before the seam
    assert read_arch(old) == (head, arch)


def test_the_head_builds_trains_exports_and_proposes_one_drafter(tmp_path):
    """build -> loss (teacher-forced) -> export -> load_export gives the same module; its proposer is the one
    the decoder uses (head_of)."""
    from eval.beam import BeamProposer
    from eval.sampling import ChainProposer
    from eval.speculative import SpeculativeDecoder
    from pipeline.loss import make_batch, position_weights
    from pipeline.shards import TeacherSequence
    from tests.test_tree import tiny_llama

    head = head_type("redrafter")
    model = tiny_llama("sdpa")
    V, H = model.config.vocab_size, model.config.hidden_size
    cfg = load_config(["recipe=tiny", "drafter.exit_dim=16", "drafter.draft_vocab_size=0"]).drafter
    arch = head.make_arch(V, H, cfg)
    embed = model.get_input_embeddings().weight.detach()
    module = head.build(arch, embed, 0, None)
    assert head_of(module) is head and arch == make_arch(V, H, exit_dim=16, horizon=cfg.horizon)
    gen = torch.Generator().manual_seed(0)
    n = 8
    seq = TeacherSequence(prompt_id="p", prompt_len=2, tokens=torch.randint(0, V, (n,), generator=gen).numpy(),
                          hidden=torch.randn(n, H, generator=gen).numpy(),
                          topk_ids=torch.randint(0, V, (n, 4), generator=gen).numpy(),
                          topk_logprobs=torch.log_softmax(torch.randn(n, 4, generator=gen), -1).numpy() - 0.1,
                          tail_logprob=torch.full((n,), -2.3).numpy())
    K = arch.horizon - 1
    loss, stats = head.loss(module, make_batch([seq], K), position_weights(K, 1.0), {"objective": "kl"})
    loss.backward()
    assert torch.isfinite(loss) and module.lm_head[-1].weight.grad is not None
    head.export({k: v.detach() for k, v in module.state_dict().items()}, arch, tmp_path / "export")
    loaded = head.load_export(tmp_path / "export", embed, torch.float32)
    again = head.from_state(arch, module.state_dict(), embed)
    h = torch.randn(3, H)
    s = module.next_state(module.init_state(h, 3), torch.tensor([1, 2, 3]))
    torch.testing.assert_close(again.logits(h, s), module.logits(h, s))
    torch.testing.assert_close(loaded.logits(h, s), module.logits(h, s), atol=0.05, rtol=0.05)  # bf16 export
    dec = SpeculativeDecoder(model, module, 2, 3)
    assert isinstance(dec.parts()[0], BeamProposer)
    sampler = SpeculativeDecoder(model, module, 2, 3, temperature=0.5)
    assert isinstance(sampler.parts(torch.Generator())[0], ChainProposer)
