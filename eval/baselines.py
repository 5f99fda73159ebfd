"""Training-free greedy decoding baselines, measured side by side with the ReDrafter decoder on the same
base model. Both are lossless: output == `model.generate(do_sample=False)` token for token.

    from eval.baselines import prompt_lookup_generate, lookahead_generate
    result = prompt_lookup_generate(model, prompts, max_new_tokens=128, eos_token_id=tok.eos_token_id)
    result = lookahead_generate(model, prompts, max_new_tokens=128, eos_token_id=tok.eos_token_id)

- prompt lookup (Saxena 2023): transformers' own assisted generation, candidates copied from the
  context after its latest match of the last 1..max_ngram_size tokens (this file).
- Lookahead decoding (Fu et al. 2024): Jacobi window + n-gram pool + verification in one forward, on
  the decoder's static cache (eval/lookahead.py).

tau (`DecodeStats.tokens_per_step`) means committed tokens per base forward for every decoder here.
"""

from __future__ import annotations

import time

import torch

from eval.decoder import GenerationResult, check_prompts, truncate, without_cuda_graphs
from eval.lookahead import LookaheadDecoder, lookahead_generate  # noqa: F401  (re-exported)
from eval.metrics import DecodeStats


class ForwardLog:
    """Forward pre-hook on the model: (query tokens, cached tokens) of every base forward. transformers
    does not report assisted generation's accept counts, so they are read off the cache lengths."""

    def __init__(self, model):
        self.calls: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        cache = kwargs.get("past_key_values")
        self.calls.append((input_ids.shape[1], cache.get_seq_length() if cache is not None else 0))

    def remove(self) -> None:
        self.handle.remove()


def assisted_steps(calls: list[tuple[int, int]], prompt_len: int, num_new: int) -> tuple[list[int], list[int]]:
    """(committed tokens, verified tokens) per forward of one assisted generation.

    Before forward k the sequence holds cur_len_k tokens and the cache cur_len_k - 1 of them (the
    cache is cropped to the accepted tokens after each forward; the last token is fed again with the
    candidates), except forward 0, which prefills the whole prompt together with the first
    candidates. So cur_len_k = cached_k + 1 for k >= 1, committed_k = cur_len_{k+1} - cur_len_k, and the
    forward verified its candidates + 1 tokens = queries - (cur_len_k - 1 - cached_k)."""
    cur_len = [prompt_len] + [cached + 1 for _, cached in calls[1:]] + [prompt_len + num_new]
    committed = [b - a for a, b in zip(cur_len, cur_len[1:])]
    verified = [queries - (cur - 1 - cached) for (queries, cached), cur in zip(calls, cur_len)]
    assert all(c >= 1 for c in committed) and all(v >= c for v, c in zip(verified, committed)), (calls, cur_len)
    return committed, verified


@torch.no_grad()
def prompt_lookup_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None,
                           num_tokens: int = 10, max_ngram_size: int = 3) -> GenerationResult:
    """Prompt lookup decoding through `model.generate(prompt_lookup_num_tokens=...)`, greedy, one prompt
    at a time (transformers' assisted generation is batch 1 only), timed over all prompts.

    Stats: DecodeStats(beam_width=1, beam_length=num_tokens + 1) (one candidate of up to num_tokens
    tokens after the last committed one); one record per base forward, the first one included: it
    prefills the prompt AND verifies the first candidates, so it commits tokens like any other step.
    tau = committed tokens per forward; num_forwards = every base forward (== records)."""
    check_prompts(prompts)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_tokens < 1 or max_ngram_size < 1:
        raise ValueError(f"need num_tokens >= 1 and max_ngram_size >= 1, got {num_tokens}, {max_ngram_size}")
    stats = DecodeStats(beam_width=1, beam_length=num_tokens + 1)
    pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:  # batch 1 never pads; set only to silence generate()'s warning
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    outputs = []
    start = time.perf_counter()
    with without_cuda_graphs(model):  # generate() keeps forward outputs (K/V) across forwards
        for prompt in prompts:
            outputs.append(_prompt_lookup_one(model, prompt, max_new_tokens, eos_token_id, pad_token_id, num_tokens,
                                              max_ngram_size, stats))
    return GenerationResult(outputs, stats, time.perf_counter() - start)


def _prompt_lookup_one(model, prompt: list[int], max_new_tokens: int, eos_token_id: int | None, pad_token_id: int,
                       num_tokens: int, max_ngram_size: int, stats: DecodeStats) -> list[int]:
    """One prompt through assisted generation; its steps are recorded into `stats`."""
    if max_new_tokens == 0:
        return []
    input_ids = torch.tensor([prompt], device=model.device)
    log = ForwardLog(model)
    try:
        # eos_token_id=None is passed through on purpose: it disables EOS stopping (as in our decoders)
        # instead of falling back to the model's generation_config.
        sequence = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                  pad_token_id=pad_token_id, prompt_lookup_num_tokens=num_tokens,
                                  max_matching_ngram_size=max_ngram_size)
    finally:
        log.remove()
    new = sequence[0, len(prompt):].tolist()
    committed, verified = assisted_steps(log.calls, len(prompt), len(new))
    stats.record([c - 1 for c in committed], verified)
    stats.num_forwards += len(log.calls)
    return truncate(new, max_new_tokens, eos_token_id)
