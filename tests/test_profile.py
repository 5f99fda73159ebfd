"""The step profiler times the decoder's own phases and sees the same acceptance as the decoder."""

import pytest
import torch

from eval.profile import PHASES, profile_decoder
from eval.speculative import SpeculativeDecoder
from pipeline.drafter import build_drafter, make_arch
from tests.test_tree import single_thread, tiny_llama  # noqa: F401  (single_thread: autouse fixture)


@pytest.mark.parametrize("W,L", [(1, 3), (4, 5)])
def test_profile_matches_decoder(W, L):
    model = tiny_llama("sdpa")
    cfg = model.config
    drafter = build_drafter(make_arch(cfg.vocab_size, cfg.hidden_size), model.get_input_embeddings().weight.detach())
    prompts = [[3, 5, 7, 9], [11, 2, 4]]
    dec = SpeculativeDecoder(model, drafter, W, L)
    prof = profile_decoder(dec, prompts, max_new_tokens=12, eos_token_id=None)
    expected = sum(dec.generate([p], 12, None).stats.num_forwards for p in prompts)
    assert prof["steps"] == expected
    assert set(prof["ms_per_step"]) == set(PHASES) and all(v > 0 for v in prof["ms_per_step"].values())
    assert abs(sum(prof["share"].values()) - 1.0) < 1e-9
    assert prof["plain_step_ms"] > 0 and 1.0 <= prof["tokens_per_step"] <= L


def test_cost_ratio_counts_matmul_weights():
    from eval.profile import cost_ratio

    model = tiny_llama("sdpa")
    cfg = model.config
    H, V, I, n = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * H // cfg.num_attention_heads
    base = n * (2 * H * H + 2 * H * kv + 3 * H * I) + H * V  # attention + MLP per layer, then the head
    drafter = build_drafter(make_arch(V, H), model.get_input_embeddings().weight.detach())
    c = cost_ratio(SpeculativeDecoder(model, drafter, 4, 5))
    assert c["base_macs_per_token"] == base
    assert c["drafter_macs_per_draft"] == 2 * H * H + 2 * (2 * H) ** 2 + 2 * H * V  # rnn_w, rnn_u, 2 blocks, head
    assert c["drafts_per_step"] == 16


def test_forward_cost_curve(tiny_model_dir):
    from eval.forward_cost import main as forward_cost

    threads = torch.get_num_threads()
    try:
        report = forward_cost(["--model", str(tiny_model_dir), "--queries", "1,4", "--context", "16", "--repeats", "3",
                               "--threads", "1", "--profile"])
    finally:
        torch.set_num_threads(threads)
    assert set(report["ms"]) == {1, 4} and all(m["min"] <= m["median"] <= m["max"] for m in report["ms"].values())
    b = report["profile"][4]
    assert b["mm_ms"] > 0 and b["total_ms"] >= b["mm_ms"] + b["attention_ms"]
    if torch.backends.mkldnn.is_available():  # the oneDNN linears (eval.cpu_kernels) are priced as matmuls too
        try:
            report = forward_cost(["--model", str(tiny_model_dir), "--queries", "1,4", "--context", "16",
                                   "--repeats", "3", "--threads", "1", "--profile", "--cpu-kernels", "onednn"])
        finally:
            torch.set_num_threads(threads)
        assert report["cpu_kernels"] == "onednn" and report["profile"][4]["mm_ms"] > 0
