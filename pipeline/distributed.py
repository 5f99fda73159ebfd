"""Everything DeepSpeed: the engine, its checkpoints, and the full fp32 weights. The ONLY module that
calls `deepspeed.initialize` (the train loop in pipeline/train.py imports from here).

The process group already exists when these run (Ray Train's TorchTrainer set it up: gloo on CPU,
nccl on GPU), hence `dist_init_required=False`. On CPU DeepSpeed picks its "cpu" accelerator by
itself; nothing here asks for fused or CUDA-only kernels: the optimizer is a plain torch AdamW passed
in (ZeRO accepts it with `zero_allow_untested_optimizer`) and the learning-rate schedule is a torch
LambdaLR, which DeepSpeed steps after every optimizer step and saves in its checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.config import TrainConfig

CKPT_TAG = "state"  # one DeepSpeed tag per checkpoint folder (each Ray checkpoint is its own folder)
META = "meta.json"  # human-readable step / data position / config, written by rank 0 (nanochat style)


def deepspeed_config(train_cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config for one training run. Batches are built by our own loader, so the
    batch sizes here are bookkeeping (one micro batch of `batch_size` sequences per rank, no accumulation)."""
    return {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": train_cfg.batch_size * world_size,
        "gradient_clipping": train_cfg.grad_clip,
        "bf16": {"enabled": train_cfg.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": train_cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW: portable, no CUDA extension
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def lr_lambda(warmup_steps: int, total_steps: int):
    """Multiplier of the base lr at optimizer step s (0-based): linear warmup over `warmup_steps`
    (first step already at lr / warmup_steps, never 0), then linear decay to 0 at `total_steps`."""
    def f(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup_steps))
    return f


def skip_shm_all_reduce(deepspeed) -> None:
    """Tell DeepSpeed not to JIT-build its shared-memory all-reduce (`deepspeed_shm_comm`). Its CPU
    communication backend builds that C++ op when it starts, but only `inference_all_reduce` (inference
    tensor parallelism) uses it; training all-reduces go through torch.distributed (gloo here). The
    build took 30-47 s on a 2-core machine, once per virtual environment, and again each time a second
    environment on the machine had built it last (torch keys the cache by name, not by path).
    DeepSpeed keeps `deepspeed.ops.__compatible_ops__` as one module-level dict so that edits to it persist."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_engine(model: torch.nn.Module, train_cfg: TrainConfig, world_size: int, total_steps: int):
    """A DeepSpeed engine around `model` (its trainable parameters get AdamW + the warmup/decay lr)."""
    import deepspeed

    skip_shm_all_reduce(deepspeed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg.warmup_steps, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(train_cfg, world_size),
                                           dist_init_required=False)
    return engine


def _rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain numbers only, so that loading them back
    needs no unpickling of arbitrary objects (`torch.load(..., weights_only=True)`)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])


def load_rng_file(path: Path) -> dict:
    """An RNG file of a checkpoint, loaded without unpickling arbitrary objects."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle's errors vary; the message says what to do
        raise ValueError(f"{path} cannot be loaded as plain tensors (weights_only=True): it was written by an older "
                         f"draftforge or is not ours ({e.__class__.__name__}). Delete that checkpoint folder to start "
                         "the training over, or finish it with the draftforge version that wrote it.") from e


def save_checkpoint(engine, ckpt_dir: Path, client_state: dict, meta: dict | None = None) -> None:
    """All ranks: DeepSpeed's model/optimizer/scheduler files + `client_state` (rank 0 stores it,
    every rank gets it back), plus this rank's RNG state in its own file (RNG differs per rank,
    and client_state is written by rank 0 only). Rank 0 also writes META for humans."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir), tag=CKPT_TAG, client_state=client_state, save_latest=True)
    torch.save(_rng_state(), ckpt_dir / f"rng_rank{engine.global_rank}.pt")
    if engine.global_rank == 0:
        (ckpt_dir / META).write_text(json.dumps({**client_state, **(meta or {})}, indent=2, default=str) + "\n")


# The non-tensor objects DeepSpeed pickles into its checkpoints (ZeRO 1-3, fp32 and bf16), found by loading
# its checkpoints with weights_only=True (tests/test_security.py). Nothing else is unpickled.
_DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@contextlib.contextmanager
def weights_only_loads():
    """Every `torch.load` inside the block is weights_only=True, also DeepSpeed's own (which ask for
    weights_only=False): TORCH_FORCE_WEIGHTS_ONLY_LOAD, with DeepSpeed's few checkpoint classes allowed.
    A checkpoint holding any other pickled object is refused with a clear error, never unpickled."""
    import importlib

    allowed = []
    for name in _DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: its checkpoints do not hold it
            pass
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as e:
        raise ValueError(f"a checkpoint file holds a pickled object that draftforge does not load (only tensors and "
                         f"DeepSpeed's own checkpoint classes are; {str(e).splitlines()[0]}). It was not written by "
                         "this pipeline's DeepSpeed, or by a version that pickles more: delete the checkpoint folder "
                         "to train from the start") from e
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def load_checkpoint(engine, ckpt_dir: Path) -> dict:
    """All ranks: restore weights, optimizer, lr schedule and RNG; returns the saved client_state.
    Nothing is unpickled beyond tensors and DeepSpeed's checkpoint classes (`weights_only_loads`)."""
    with weights_only_loads():
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=CKPT_TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"{ckpt_dir} holds no DeepSpeed checkpoint (tag {CKPT_TAG!r})")
    rng_file = ckpt_dir / f"rng_rank{engine.global_rank}.pt"
    if rng_file.is_file():
        _set_rng_state(load_rng_file(rng_file))
    return client_state


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """All ranks must call (under ZeRO-3 this gathers partitions); rank 0 gets the full fp32 weights on
    CPU under the module's own parameter names, other ranks an empty dict. Frozen buffers (the base
    embedding table) are not parameters, so they are not included."""
    state = {}
    from deepspeed.utils import safe_get_full_fp32_param

    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # ZeRO 1-3 / bf16: the fp32 master copy, assembled
        if full is None:  # no ZeRO, fp32: the parameter is the master copy
            full = param.detach()
        if engine.global_rank == 0:
            state[name] = full.detach().float().cpu().clone()
    d2t = getattr(engine.module, "d2t", None)  # the draft vocabulary's id map: a buffer, saved with the weights
    if d2t is not None and engine.global_rank == 0:
        state["d2t"] = d2t.detach().cpu().clone()
    return state
