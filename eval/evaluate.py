"""Eval stage: speculative decoding vs plain greedy decoding of the same base model, same prompts,
same process, interleaved repeats. Writes eval_record.json and eval.png into the stage directory.

    python -m pipeline.main recipe=tiny run.stages=[eval]     # re-run just this stage
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from data.prompts import load_prompts
from eval.decoder import GenerationResult, SpeculativeDecoder, plain_greedy
from eval.metrics import DecodeStats
from pipeline.base_model import input_embeddings, load_base_model
from pipeline.config import DataConfig, EvalConfig, ModelConfig
from pipeline.drafter import Drafter, DrafterArch
from pipeline.lineage import hash_json, sha256_file


def load_trained_drafter(drafter_dir: Path, base_model, dtype: torch.dtype) -> Drafter:
    """The train stage's fp32 drafter, checked against the base model it will draft for."""
    arch = DrafterArch(**json.loads((drafter_dir / "arch.json").read_text()))
    cfg = base_model.config
    if arch.vocab_size != cfg.vocab_size or arch.hidden_size != cfg.hidden_size:
        raise ValueError(
            f"drafter in {drafter_dir} was trained for vocab_size={arch.vocab_size}, hidden_size={arch.hidden_size} "
            f"but the base model has vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}: "
            "tokenizer/vocab mismatch between drafter and base model"
        )
    drafter = Drafter(arch, input_embeddings(base_model))
    drafter.load_state_dict(load_file(str(drafter_dir / "drafter.safetensors")))
    return drafter.to(base_model.device, dtype).eval()


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _run(decode, prompts: list[list[int]], batch_size: int, desc: str) -> tuple[list[list[int]], DecodeStats, float]:
    tokens, stats, seconds = [], [], 0.0
    for batch in tqdm(list(_batches(prompts, batch_size)), desc=desc, leave=False, unit="batch"):
        result: GenerationResult = decode(batch)
        tokens += result.tokens
        stats.append(result.stats)
        seconds += result.seconds
    return tokens, DecodeStats.merge(stats), seconds


def _mean_ci(xs: list[float]) -> tuple[float, float]:
    """mean and the half-width of a normal-approximation 95% interval (0 for one sample)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, 1.96 * sd / math.sqrt(len(xs))


@torch.inference_mode()
def run_eval(model_cfg: ModelConfig, data_cfg: DataConfig, eval_cfg: EvalConfig, drafter_dir: Path,
             out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = {"drafter": sha256_file(drafter_dir / "drafter.safetensors"), "eval": vars(eval_cfg).copy(),
              "data": {"eval": vars(data_cfg.eval), "max_prompt_tokens": data_cfg.max_prompt_tokens},
              "model": vars(model_cfg)}
    record_path = out_dir / "eval_record.json"
    if record_path.is_file():
        done = json.loads(record_path.read_text())
        if done.get("inputs_hash") == hash_json(inputs):
            print(f"eval: already done for this drafter and settings, reusing {record_path}")
            return done
    if eval_cfg.num_threads:
        torch.set_num_threads(eval_cfg.num_threads)
    model, tokenizer = load_base_model(model_cfg, device=eval_cfg.device, dtype=eval_cfg.dtype)
    dtype = model.dtype
    drafter = load_trained_drafter(drafter_dir, model, dtype)
    prompts = load_prompts(data_cfg.eval, tokenizer, data_cfg.max_prompt_tokens, data_cfg.chat_template)
    if eval_cfg.num_prompts:
        prompts = prompts[: eval_cfg.num_prompts]
    prompt_ids = [p.input_ids for p in prompts]
    W, L, eos = eval_cfg.beam_width, eval_cfg.beam_length, tokenizer.eos_token_id
    decoder = SpeculativeDecoder(model, drafter, beam_width=W, beam_length=L)

    def spec(batch):
        return decoder.generate(batch, eval_cfg.max_new_tokens, eos)

    def plain(batch):
        return plain_greedy(model, batch, eval_cfg.max_new_tokens, eos)

    # warm-up (allocator, first-call overheads) on one prompt, not timed
    spec(prompt_ids[:1]), plain(prompt_ids[:1])
    spec_tps, plain_tps, speedups, mismatches = [], [], [], set()
    spec_stats = None
    t0 = time.time()
    for rep in range(eval_cfg.repeats):
        # alternate which goes first so drift (thermal, other load) does not favour one side
        order = [("spec", spec), ("plain", plain)] if rep % 2 == 0 else [("plain", plain), ("spec", spec)]
        outs = {}
        for name, fn in order:
            outs[name] = _run(fn, prompt_ids, eval_cfg.batch_size, f"eval {name} {rep + 1}/{eval_cfg.repeats}")
        (s_tok, s_stats, s_sec), (p_tok, _, p_sec) = outs["spec"], outs["plain"]
        n_tokens = sum(len(t) for t in p_tok)
        mismatches |= {prompts[i].id for i, (a, b) in enumerate(zip(s_tok, p_tok)) if a != b}
        spec_tps.append(sum(len(t) for t in s_tok) / s_sec)
        plain_tps.append(n_tokens / p_sec)
        speedups.append(spec_tps[-1] / plain_tps[-1])
        spec_stats = s_stats if spec_stats is None else spec_stats
    speedup, speedup_ci = _mean_ci(speedups)
    stats = spec_stats.to_dict()
    record = {
        "inputs_hash": hash_json(inputs),
        "num_prompts": len(prompts),
        "beam_width": W, "beam_length": L, "batch_size": eval_cfg.batch_size,
        "max_new_tokens": eval_cfg.max_new_tokens, "device": eval_cfg.device, "dtype": eval_cfg.dtype,
        "torch_threads": torch.get_num_threads(),
        "lossless": not mismatches, "mismatched_prompts": sorted(mismatches),
        "tokens_per_step": stats["tokens_per_step"],
        "acceptance_per_position": stats["acceptance_per_position"],
        "verified_tokens_per_step": stats["verified_tokens_per_step"],
        "verified_fraction_of_WL": stats["verified_fraction_of_WL"],
        "spec_tokens_per_s": sum(spec_tps) / len(spec_tps),
        "plain_tokens_per_s": sum(plain_tps) / len(plain_tps),
        "speedup": speedup, "speedup_ci95": speedup_ci, "speedup_per_repeat": speedups,
        "decode_stats": stats,
        "seconds": time.time() - t0,
    }
    plot_record(record, out_dir / "eval.png")
    record_path.write_text(json.dumps(record, indent=2) + "\n")  # written last: it marks the stage done
    return record


def plot_record(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    acc = [a if a is not None else 0.0 for a in record["acceptance_per_position"]]  # None: never reached
    ax1.bar(range(1, len(acc) + 1), acc, color="tab:blue")
    ax1.set(xlabel="draft position i", ylabel="acceptance rate a_i", ylim=(0, 1),
            title=f"tau = {record['tokens_per_step']:.2f} tokens/step")
    hist = record["decode_stats"].get("tokens_per_step_histogram", {})
    if hist:
        ks = sorted(int(k) for k in hist)
        ax2.bar(ks, [hist[str(k)] if str(k) in hist else hist[k] for k in ks], color="tab:green")
    ax2.set(xlabel="tokens committed per step", ylabel="steps",
            title=f"speedup {record['speedup']:.2f}x ± {record['speedup_ci95']:.2f} vs plain greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
