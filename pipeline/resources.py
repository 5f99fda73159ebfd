"""A resource plan from the base model's config.json alone: what a run will take before it spends GPU-days.

    python -m pipeline.main recipe=llama70b --plan

No weights and no hub: config.json comes from a local directory or the local HF cache (a clear error
names what is missing otherwise). Every number is a formula over the config and the recipe, printed
with its inputs; throughputs are the recipe's stated assumptions (`resources.*`), printed as such.

Formulas (bytes per value: b = 2 for bf16/fp16, 4 for fp32):
- base parameters P: counted on an empty (meta-device) model built from the config, so any architecture
  transformers knows is counted exactly (embeddings, attention, MLP, norms, an untied lm_head).
- KV cache per token = 2 (K and V) x layers x kv_heads x head_dim x b.
- teacher replica memory = P x b + KV per token x teacher.batch_size x (max_prompt_tokens + max_new_tokens);
  GPUs per replica = ceil(that / (gpu_memory x (1 - headroom))).
- teacher tokens <= data.train.limit x teacher.max_new_tokens (responses stop earlier at their EOS).
- teacher data per token = hidden (H x 2 for float16; bfloat16 and float32 are stored as 4-byte floats)
  + token id 4 + top-k ids 4k + top-k log-probs 4k + tail 4.
- drafter parameters = rnn (2H^2 + H) + input_proj (2H x D + D, when D != 2H) + N blocks (D^2 + D)
  + output layer (D x V, or D x the draft vocabulary); the base embedding table it reads is frozen.
- training memory per GPU (mixed precision, Adam; ZeRO paper accounting, world size n):
  params 2 B (4 in fp32) per parameter, grads 2 B (4), optimizer 12 B (fp32 master + m + v; 8 B in
  fp32 without a master copy); ZeRO-1 shards the optimizer, ZeRO-2 also the grads, ZeRO-3 also the
  params (/ n each); plus the frozen embedding table (V x H x b) and activations at the micro-batch:
  batch x (max_new_tokens + 1) x (horizon - 1) x (output rows x 4 B x 3 + D x 4 B x (2N + 2)).
- checkpoint = drafter parameters x (params + optimizer bytes); the export = parameters x 2 B.
- hours: teacher = tokens / (teacher_tokens_per_s x replicas); train = epochs x tokens /
  (train_tokens_per_s x workers); eval = methods x repeats x prompts x max_new_tokens / eval_tokens_per_s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import resolve_drafter
from pipeline.shards import hidden_bytes_per_position

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2}
GB = 1e9


@dataclass
class Plan:
    rows: list[tuple[str, str]]  # (quantity, value with its formula inputs)
    assumptions: list[tuple[str, str]]
    numbers: dict  # the raw numbers, for tests and tools

    def text(self) -> str:
        width = max(len(k) for k, _ in self.rows + self.assumptions)
        lines = ["=== resource plan (from config.json; no weights loaded) ==="]
        lines += [f"{k:<{width}}  {v}" for k, v in self.rows]
        lines += ["assumptions (resources.* in the recipe; replace them with your cluster's measurements):"]
        assumed = max((len(k) for k, _ in self.assumptions), default=0)
        lines += [f"  {k:<{assumed}}  {v}" for k, v in self.assumptions]
        return "\n".join(lines)


def load_model_config(model_cfg):
    """The base model's config from a local directory, a converted GGUF, or the local HF cache only."""
    from pathlib import Path

    from transformers import AutoConfig

    source = model_cfg.base_model
    if source.startswith("pkg:") or source.endswith(".gguf"):
        from pipeline.base_model import resolve_model_path

        source = resolve_model_path(model_cfg)
    try:
        return AutoConfig.from_pretrained(source, revision=model_cfg.revision or None, local_files_only=True,
                                          trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        where = "that directory has no config.json" if Path(source).is_dir() else \
            "it is not in the local Hugging Face cache"
        raise ValueError(f"no config.json for model.base_model={model_cfg.base_model!r}: {where}. Fetch only the "
                         f"config (`huggingface-cli download {model_cfg.base_model} config.json`) or point "
                         "model.base_model at a directory holding it.") from e


def count_parameters(config) -> int:
    """Exact parameter count of the model a config describes, built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def drafter_parameters(H: int, D: int, N: int, out_rows: int, rnn: bool) -> int:
    return ((2 * H * H + H) if rnn else 0) + ((2 * H * D + D) if D != 2 * H else 0) + N * (D * D + D) + D * out_rows


def resource_plan(cfg, config) -> Plan:
    text = config.get_text_config()
    r, t, tr, ev = cfg.resources, cfg.teacher, cfg.train, cfg.eval
    b = BYTES[cfg.model.dtype]
    H, V, layers = text.hidden_size, text.vocab_size, text.num_hidden_layers
    d = resolve_drafter(cfg.drafter, V)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or H // heads
    P = count_parameters(config)
    weights = P * b
    kv_per_token = 2 * layers * kv_heads * head_dim * b
    kv_batch = kv_per_token * t.batch_size * (cfg.data.max_prompt_tokens + t.max_new_tokens)
    usable = r.gpu_memory_gb * GB * (1 - r.memory_headroom)
    gpus_needed = math.ceil((weights + kv_batch) / usable)
    tokens = cfg.data.train.limit * t.max_new_tokens if cfg.data.train.limit else 0
    hidden_bytes = hidden_bytes_per_position(H, t.hidden_dtype)
    per_token = hidden_bytes + 4 + 8 * t.top_k + 4
    D = d.exit_dim or 2 * H
    out_rows = d.draft_vocab_size or V
    dp = drafter_parameters(H, D, d.num_draft_layers, out_rows, d.rnn)
    n = tr.num_workers
    p_b, g_b, o_b = (2, 2, 12) if tr.precision == "bf16" else (4, 4, 8)
    shard = {0: (1, 1, 1), 1: (1, 1, n), 2: (1, n, n), 3: (n, n, n)}[tr.zero_stage]
    states = dp * (p_b / shard[0] + g_b / shard[1] + o_b / shard[2])
    embed = V * H * BYTES[cfg.model.dtype]
    K = d.horizon - 1
    activations = tr.batch_size * (t.max_new_tokens + 1) * K * (out_rows * 4 * 3 + D * 4 * (2 * d.num_draft_layers + 2))
    train_mem = states + embed + activations
    checkpoint = dp * (p_b + o_b)
    methods = 2 + len(ev.baselines)
    teacher_h = tokens / (r.teacher_tokens_per_s * t.num_actors) / 3600
    train_h = tr.epochs * tokens / (r.train_tokens_per_s * n) / 3600
    eval_h = methods * ev.repeats * (ev.num_prompts or 80) * ev.max_new_tokens / r.eval_tokens_per_s / 3600
    numbers = {"base_parameters": P, "base_weight_bytes": weights, "kv_bytes_per_token": kv_per_token,
               "teacher_kv_bytes": kv_batch, "teacher_gpus_needed": gpus_needed, "teacher_tokens": tokens,
               "teacher_bytes_per_token": per_token, "teacher_bytes": per_token * tokens,
               "drafter_parameters": dp, "train_state_bytes_per_gpu": states, "train_embedding_bytes": embed,
               "train_activation_bytes": activations, "train_bytes_per_gpu": train_mem,
               "checkpoint_bytes": checkpoint, "export_bytes": dp * 2,
               "teacher_hours": teacher_h, "train_hours": train_h, "eval_hours": eval_h}
    replica_gpus = t.stages * t.gpus_per_actor  # a split replica: each stage actor has gpus_per_actor
    fits = "fits" if replica_gpus >= gpus_needed else "TOO FEW: raise teacher.gpus_per_actor or teacher.stages"
    rows = [
        ("base model", f"{type(config).__name__}: {layers} layers, hidden {H}, {heads} heads ({kv_heads} KV, "
                       f"head_dim {head_dim}), vocab {V}"),
        ("base parameters", f"{P / 1e9:.3f} B = {weights / GB:.1f} GB at {cfg.model.dtype}"),
        ("KV cache per token", f"{kv_per_token / 1024:.0f} KiB (2 x {layers} x {kv_heads} x {head_dim} x {b} B)"),
        ("teacher replica", f"weights {weights / GB:.1f} GB + KV {kv_batch / GB:.1f} GB (batch {t.batch_size} x "
                            f"{cfg.data.max_prompt_tokens + t.max_new_tokens} tokens) -> {gpus_needed} GPU(s) of "
                            f"{r.gpu_memory_gb:g} GB with {100 * r.memory_headroom:.0f}% headroom; recipe: "
                            f"{replica_gpus:g} per replica"
                            + (f" = {t.stages} pipeline stages x {t.gpus_per_actor:g}" if t.stages > 1 else "")
                            + f" ({fits})"),
        ("teacher replicas", f"{t.num_actors} ({t.num_actors * t.stages * max(t.gpus_per_actor, 1):g} GPUs)"),
        ("teacher tokens", f"<= {tokens:,} ({cfg.data.train.limit:,} prompts x {t.max_new_tokens} new tokens)"),
        ("teacher data", f"{per_token:,} B/token (hidden {hidden_bytes} + top-{t.top_k} {8 * t.top_k} + ids/tail 8) "
                         f"-> {per_token * tokens / GB:,.1f} GB"),
        ("drafter parameters", f"{dp / 1e6:.1f} M (exit {D}, {d.num_draft_layers} blocks, output rows {out_rows}"
                               f"{' = draft vocabulary' if d.draft_vocab_size else ' = full vocabulary'})"),
        ("train memory / GPU", f"{train_mem / GB:.2f} GB = states {states / GB:.2f} (ZeRO-{tr.zero_stage} over {n}, "
                               f"{tr.precision}) + frozen embedding {embed / GB:.2f} + activations "
                               f"{activations / GB:.2f} (micro-batch {tr.batch_size})"),
        ("checkpoint", f"{checkpoint / GB:.2f} GB with optimizer states; export {dp * 2 / GB:.3f} GB (bf16)"),
        *([("WARNING", f"training needs {train_mem / GB:.1f} GB per GPU, more than {usable / GB:.1f} GB usable: lower "
                       "train.batch_size, shard more (ZeRO-3, more workers) or use a draft vocabulary "
                       "(drafter.draft_vocab_size)")] if train_mem > usable else []),
        ("hours", f"teacher {teacher_h:.1f}, train {train_h:.1f}, eval {eval_h:.1f} (at the assumptions below)"),
    ]
    assumptions = [("teacher_tokens_per_s", f"{r.teacher_tokens_per_s:g} per replica (generation + recording)"),
                   ("train_tokens_per_s", f"{r.train_tokens_per_s:g} per GPU"),
                   ("eval_tokens_per_s", f"{r.eval_tokens_per_s:g} (plain decoding, batch {ev.batch_size}; "
                                         f"{methods} methods x {ev.repeats} repeats)"),
                   ("gpu_memory_gb", f"{r.gpu_memory_gb:g}, headroom {r.memory_headroom:g}")]
    return Plan(rows, assumptions, numbers)
