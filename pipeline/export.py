"""Export a drafter in the reference ReDrafter / TensorRT-LLM layout (docs/design.md §2) and load it back.

    <dir>/config.json        model_type "recurrent_drafting_drafter" + the keys the converters read
    <dir>/model.safetensors  ONE file, bf16 (or fp16), the spec's tensor names

TensorRT-LLM's `examples/redrafter/convert_checkpoint.py` reads hidden_size, exit_dim,
num_draft_layers and rnn from config.json; our extra keys are ignored by the loaders.

Two kinds (docs/design.md §2):
- full vocabulary (`draft_vocab_size` 0): exactly the reference format; Apple's reference PyTorch
  and MLX loaders and TensorRT-LLM's converter accept it.
- draft vocabulary (N > 0): a documented EXTENSION: the same tensors, but `lm_head.{N}.weight` has
  N rows instead of vocab_size, plus `d2t` (int64 [N], draft index -> base token id), and config.json
  says `draft_vocab_size: N`. The reference loaders and TensorRT-LLM's converter do NOT accept it
  (they size the output layer by vocab_size); draftforge's own loader (`load_exported`) does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.drafter import Drafter, DrafterArch

MODEL_TYPE = "recurrent_drafting_drafter"
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def expected_tensors(arch: DrafterArch) -> dict[str, tuple[int, ...]]:
    """name -> shape, exactly as the spec lists them."""
    H, D, N = arch.hidden_size, arch.exit_dim, arch.num_draft_layers
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(N):
        shapes[f"lm_head.{i}.linear.weight"] = (D, D)
        shapes[f"lm_head.{i}.linear.bias"] = (D,)
    shapes[f"lm_head.{N}.weight"] = (arch.out_size, D)
    if arch.draft_vocab_size:
        shapes["d2t"] = (arch.draft_vocab_size,)
    if arch.rnn:
        shapes.update({"rnn_u.weight": (H, H), "rnn_u.bias": (H,), "rnn_w.weight": (H, H)})
    if D != 2 * H:
        shapes.update({"input_proj.weight": (D, 2 * H), "input_proj.bias": (D,)})
    return shapes


def check_state_dict(state: dict[str, torch.Tensor], arch: DrafterArch) -> None:
    want = expected_tensors(arch)
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(f"drafter tensors do not match the export format: missing {missing}, "
                         f"unexpected {extra}, wrong shapes {[(k, got[k], want[k]) for k in wrong]}")


def export_config(arch: DrafterArch, dtype: str) -> dict:
    return {
        "model_type": MODEL_TYPE,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "exit_dim": arch.exit_dim,
        "num_draft_layers": arch.num_draft_layers,
        "num_lookback_tokens": -1,  # unused by the recurrent drafter, kept for the loaders
        "rnn": arch.rnn,
        "torch_dtype": dtype,
        # ours: the trained horizon in both conventions (the naming trap of docs/design.md §2)
        "beam_length": arch.horizon,  # reference convention: INCLUDES g0
        "redrafter_draft_len_per_beam": arch.horizon - 1,  # TensorRT-LLM convention: excludes g0
        # ours: 0 = the reference format; N > 0 = the draft-vocabulary extension (d2t tensor, N-row head)
        "draft_vocab_size": arch.draft_vocab_size,
    }


def export_drafter(state: dict[str, torch.Tensor], arch: DrafterArch, out_dir: str | Path,
                   dtype: str = "bfloat16", tensor_parallel_sizes: tuple[int, ...] = (2, 4, 8)) -> Path:
    """Write config.json + model.safetensors into out_dir (created; must not hold other files)."""
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"export dtype must be bfloat16 or float16 (what serving loads), got {dtype!r}")
    check_state_dict(state, arch)
    bad_tp = [tp for tp in tensor_parallel_sizes if arch.vocab_size % tp]
    if bad_tp:
        warnings.warn(f"vocab_size {arch.vocab_size} is not divisible by tensor-parallel sizes {bad_tp}: "
                      "serving with those TP sizes will need padding", stacklevel=2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the id map stays integer; weights go to the serving dtype
    tensors = {k: v.detach().to("cpu", v.dtype if k == "d2t" else EXPORT_DTYPES[dtype]).contiguous()
               for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(export_config(arch, dtype), indent=2) + "\n")
    return out


def arch_from_export_config(config: dict) -> DrafterArch:
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"not a ReDrafter drafter config: model_type={config.get('model_type')!r}")
    return DrafterArch(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                       exit_dim=config["exit_dim"], num_draft_layers=config["num_draft_layers"],
                       rnn=config["rnn"], horizon=config.get("beam_length", 5),
                       draft_vocab_size=config.get("draft_vocab_size", 0))


def load_exported(export_dir: str | Path, embed_weight_VH: torch.Tensor, dtype=torch.float32) -> Drafter:
    """Rebuild a Drafter from an export directory and the base model's embedding table."""
    export_dir = Path(export_dir)
    arch = arch_from_export_config(json.loads((export_dir / "config.json").read_text()))
    state = load_file(str(export_dir / "model.safetensors"))
    check_state_dict(state, arch)
    return drafter_from_state(arch, state, embed_weight_VH, dtype)


def drafter_from_state(arch: DrafterArch, state: dict[str, torch.Tensor], embed_weight_VH: torch.Tensor,
                       dtype=torch.float32) -> Drafter:
    """A Drafter holding `state` (weights cast to dtype; the d2t id map, when there is one, kept as ids)."""
    drafter = Drafter(arch, embed_weight_VH, state.get("d2t"))
    drafter.load_state_dict({k: v if k == "d2t" else v.to(dtype) for k, v in state.items()})
    return drafter.to(dtype).eval()  # Module.to(dtype) casts floating tensors only: d2t stays int64


def main(argv: list[str] | None = None) -> int:
    """python -m pipeline.export --check DIR --base-model MODEL: check a received export (pipeline/handoff.py)."""
    import argparse
    import sys

    from pipeline.handoff import check_export

    ap = argparse.ArgumentParser(prog="python -m pipeline.export", description=main.__doc__)
    ap.add_argument("--check", type=Path, required=True, help="an export directory (or its drafter/ inside)")
    ap.add_argument("--base-model", required=True, help="the base model it is served with (hub id, dir, .gguf, pkg:)")
    args = ap.parse_args(argv)
    problems = check_export(args.check, args.base_model)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"OK: {args.check} is a sound drafter for {args.base_model} (hashes, tensors, beam settings, base model, "
          "lossless smoke test)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
