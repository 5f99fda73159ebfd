"""Every mainstream decoder-only family through the decoder, the teacher and a drafter step
(pipeline/support.py TESTED_FAMILIES; docs/design.md §6 "Model families").

    python -m pytest tests/test_families.py -q

Each family is a small random-init model built here (no downloads), with the features that make it
not-Llama switched on: sliding-window layers (every layer, or hybrid with global layers), attention and
final-logit soft-capping (Gemma 2, with caps small enough to bend the logits), scaled embeddings and
local/global RoPE (Gemma 3), attention sinks and experts (gpt-oss). Windows are 8 tokens and every
prompt + generation is longer (up to 36 tokens), so a mask that ignored a window would show.

The references are the model's own: `generate` for plain greedy, a fresh forward per path for the
packed tree, `model(...).logits` for the teacher's records. Speculative decoding is compared with plain
greedy token for token with a drafter that is often right (ragged acceptance), tree on and off, W 1
and 4, batch 1 and 4.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import eval.decoder as decoder_module
from eval.baselines import prompt_lookup_generate
from eval.decoder import forward_tree, plain_greedy, prefill
from eval.lookahead import LookaheadDecoder
from eval.speculative import SpeculativeDecoder
from eval.tree import pack_tree
from pipeline.config import TeacherConfig
from pipeline.drafter import build_drafter, make_arch
from pipeline.loss import distill_loss, make_batch, position_weights
from pipeline.support import TESTED_FAMILIES, attention_windows, check_support
from pipeline.teacher import teacher_records
from tests.test_decoder import TableDrafter, hf_greedy, seen_bigram_table
from tests.test_tree import single_thread  # noqa: F401  (autouse fixture)

V, WINDOW, MAX_NEW = 256, 8, 12
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
HYBRID = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
FAMILIES = {  # model_type: (config class, extra config)
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW, "head_dim": 16}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2,
                              "head_dim": 16}),
    "phi3": ("Phi3Config", {"sliding_window": WINDOW}),
    "gemma2": ("Gemma2Config", {"sliding_window": WINDOW, "head_dim": 16, "final_logit_softcapping": 0.5,
                                "attn_logit_softcapping": 1.0}),
    "gemma3_text": ("Gemma3TextConfig", {"sliding_window": WINDOW, "head_dim": 16, "layer_types": HYBRID}),
    "gpt_oss": ("GptOssConfig", {"sliding_window": WINDOW, "head_dim": 16, "num_local_experts": 4,
                                 "num_experts_per_tok": 2}),
}


def family_model(family: str, seed: int = 0):
    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(**COMMON, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.config.model_type == family
    return model


def make_prompts(n: int, seed: int) -> list[list[int]]:
    """Ragged prompts of 10..24 tokens: longer than the window before the first new token."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(10, 25, (n,), generator=gen).tolist()
    return [torch.randint(3, V, (n_tok,), generator=gen).tolist() for n_tok in lengths]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(name, model, prompts, plain greedy outputs, a seen-bigram drafter table)."""
    model = family_model(request.param)
    prompts = make_prompts(8, seed=1)
    plain = plain_greedy(model, prompts, MAX_NEW, None).tokens
    return request.param, model, prompts, plain, seen_bigram_table(prompts, plain)


def test_every_tested_family_has_a_test_here():
    assert set(FAMILIES) == set(TESTED_FAMILIES)
    for name in FAMILIES:
        check_support(family_model(name).config)  # and none is refused


def test_layouts_are_what_the_families_promise():
    windows = {name: attention_windows(family_model(name).config) for name in FAMILIES}
    assert windows["llama"] == (None,) * 4
    assert windows["mistral"] == windows["phi3"] == (WINDOW,) * 4
    assert windows["qwen2"] == windows["qwen3"] == (None, None, WINDOW, WINDOW)
    assert windows["gemma2"] == windows["gpt_oss"] == (WINDOW, None, WINDOW, None)
    assert windows["gemma3_text"] == (WINDOW, None, WINDOW, WINDOW)


def test_plain_greedy_equals_generate(family):
    name, model, prompts, plain, _ = family
    assert plain == hf_greedy(model, prompts, MAX_NEW, None), name


@pytest.mark.parametrize("tree_attention,width", [(True, 1), (True, 4), (False, 4)])
@pytest.mark.parametrize("batch", [1, 4])
def test_speculative_equals_plain(family, tree_attention, width, batch):
    name, model, prompts, plain, table = family
    drafter = TableDrafter(table)
    dec = SpeculativeDecoder(model, drafter, beam_width=width, beam_length=4, tree_attention=tree_attention)
    out, steps = [], 0
    for i in range(0, len(prompts), batch):
        result = dec.generate(prompts[i:i + batch], MAX_NEW, None)
        out += result.tokens
        steps += result.stats.num_forwards
    assert out == plain, name
    # the drafter is often right: drafts were accepted (fewer forwards than plain's one per token), so
    # accepted paths were committed from their packed slots and decoding went on from there
    plain_forwards = len(range(0, len(prompts), batch)) * (MAX_NEW - 1)  # the prefill gives the first token
    assert steps < 0.8 * plain_forwards, (name, steps, plain_forwards)


def _packed_vs_fresh(model, prompts, beams_BWL):
    """Max |packed-forward logits - a fresh forward over prompt + path| over every beam token."""
    state = prefill(model, prompts, max_cache_len=64, max_new_tokens=8, eos_token_id=None)
    tree = pack_tree(beams_BWL)
    _, logits_BPV, _ = forward_tree(model, state, tree)
    worst = 0.0
    for b, prompt in enumerate(prompts):
        for w in range(beams_BWL.shape[1]):
            path = beams_BWL[b, w].tolist()
            fresh = model(input_ids=torch.tensor([prompt + path])).logits[0, len(prompt):]
            packed = logits_BPV[b, tree.unpacker_BWL[b, w]]
            worst = max(worst, float((packed - fresh).abs().max()))
    return worst


@torch.no_grad()
def test_packed_forward_logits_equal_per_path_logits(family, monkeypatch):
    """One forward over a packed tree (shared prefixes, two ragged rows past the window) gives every
    path the logits a fresh forward over prompt + that path gives; with the windows ignored it does not."""
    name, model, prompts, _, _ = family
    gen = torch.Generator().manual_seed(2)
    beams_BWL = torch.randint(3, V, (2, 4, 4), generator=gen)
    beams_BWL[:, :, 0] = beams_BWL[:, :1, 0]  # one g0 per row
    beams_BWL[:, 1, 1] = beams_BWL[:, 0, 1]  # beams 0 and 1 share a 2-token prefix
    rows = [prompts[0] + prompts[1], prompts[2]]  # 20+ tokens: the tree sits past the window
    assert _packed_vs_fresh(model, rows, beams_BWL) < 1e-4, name
    if any(w is not None for w in attention_windows(model.config)):
        monkeypatch.setattr(decoder_module, "layer_windows", lambda m: (None,) * m.config.num_hidden_layers)
        assert _packed_vs_fresh(model, rows, beams_BWL) > 1e-3, f"{name}: ignoring the window changed nothing"


@torch.no_grad()
def _records(model):
    prompts = make_prompts(3, seed=3)
    gen = torch.Generator().manual_seed(4)
    responses = [torch.randint(3, V, (n,), generator=gen).tolist() for n in (6, 12, 9)]
    cfg = dataclasses.replace(TeacherConfig(), top_k=8, hidden_dtype="float32")
    return prompts, responses, teacher_records(model, ["a", "b", "c"], prompts, responses, cfg)


def test_teacher_records_equal_a_direct_forward(family):
    """Right-padded batch of ragged prompt + response pairs longer than the window: hidden states and
    top-k log-probs (soft-capped where the model caps) equal the model's own forward per sequence."""
    name, model, *_ = family
    prompts, responses, records = _records(model)
    for prompt, response, rec in zip(prompts, responses, records):
        seq = torch.tensor([prompt + response])
        with torch.no_grad():
            out = model(input_ids=seq, output_hidden_states=True)
        logprobs = out.logits[0, len(prompt) - 1:].float().log_softmax(-1)
        top, ids = logprobs.topk(8, dim=-1)
        assert torch.equal(torch.from_numpy(rec.topk_ids).long(), ids), name
        torch.testing.assert_close(torch.from_numpy(rec.topk_logprobs), top, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.from_numpy(rec.hidden), out.hidden_states[-1][0, len(prompt) - 1:],
                                   atol=1e-4, rtol=0)


def test_a_drafter_trains_one_step(family):
    """The drafter reads this family's hidden states and input embeddings, and one optimizer step on
    its records lowers the loss on them."""
    name, model, *_ = family
    _, _, records = _records(model)
    batch = make_batch(records, K=3)
    drafter = build_drafter(make_arch(V, model.config.hidden_size, exit_dim=64),
                            model.get_input_embeddings().weight.detach(), seed=0)
    opt = torch.optim.Adam([p for p in drafter.parameters() if p.requires_grad], lr=1e-2)
    weights = position_weights(3, 0.8)
    loss, _ = distill_loss(drafter(batch["h_NH"], batch["tokens_NK"]), batch, weights)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after, _ = distill_loss(drafter(batch["h_NH"], batch["tokens_NK"]), batch, weights)
    loss = float(loss)
    assert torch.isfinite(after) and float(after) < loss, (name, loss, float(after))


def test_training_free_baselines_equal_plain(family):
    """Lookahead (our packed Jacobi window through the same verify forward) and prompt lookup
    (transformers' assisted generation) are lossless on this family too."""
    name, model, prompts, plain, _ = family
    assert LookaheadDecoder(model).generate(prompts[:4], MAX_NEW, None).tokens == plain[:4], name
    assert prompt_lookup_generate(model, prompts[:4], MAX_NEW, None).tokens == plain[:4], name


def test_the_pipeline_runs_a_hybrid_soft_capped_family_end_to_end(tmp_path, ray_free):
    """The failure that motivated this file: a sliding-window model went through teacher and training,
    then the eval crashed in the verify forward. Here a Gemma 2 (alternating 8-token sliding and global
    layers, attention and final-logit soft-capping) goes through every stage of the real pipeline
    (Ray teacher actors, Ray Train + DeepSpeed, the eval with both baselines), and every method's
    output equals plain greedy token for token on prompts far longer than the window."""
    import json

    import pipeline.main as pm
    from tests.conftest import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "gemma2", config_class="Gemma2Config", head_dim=8, sliding_window=8,
                                 final_logit_softcapping=0.5, attn_logit_softcapping=1.0,
                                 max_position_embeddings=2048)
    argv = ["recipe=tiny", f"model.base_model={model_dir}", f"run.output_dir={tmp_path}", "run.name=g2",
            "tracking.mode=disabled", "run.num_cpus=2", "data.max_prompt_tokens=4096", "data.train.limit=8",
            "teacher.num_actors=1", "teacher.shard_size=4", "teacher.max_new_tokens=16", "train.num_workers=1",
            "train.epochs=1", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
            "drafter.draft_vocab_size=0", "eval.num_prompts=2", "eval.max_new_tokens=16", "eval.repeats=1"]
    assert pm.main(argv) == 0
    console = (tmp_path / "g2" / "console.log").read_text()  # the run's full console stays with it
    assert "stage teacher: will run" in console and "=== draftforge summary ===" in console
    record = json.loads((tmp_path / "g2" / "eval" / "eval_record.json").read_text())
    assert record["lossless_exact"] and not record["mismatched_prompts"]
    assert set(record["methods"]) >= {"prompt_lookup", "lookahead"}
    assert all(m["lossless"] for m in record["methods"].values()), record["methods"]
