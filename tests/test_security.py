"""Security promises (README "Security"): weights and checkpoints load without unpickling arbitrary
objects, remote code is off unless asked for and said when on, the launch script keeps Ray's token
authentication, and no secret from the environment lands in what a run writes (tests/test_two_runs.py
plants them in two real runs and searches every file those runs wrote).

    python -m pytest tests/test_security.py -q
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from tests.test_repo import REPO


def test_every_torch_load_refuses_arbitrary_objects():
    calls = []
    for path in [*REPO.glob("pipeline/*.py"), *REPO.glob("eval/*.py"), *REPO.glob("data/*.py")]:
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                calls.append((path.name, line.strip()))
    assert calls, "expected at least the checkpoint RNG loader"
    assert all("weights_only=True" in line for _, line in calls), calls
    assert not [p for p in REPO.glob("**/*.bin") if ".venv" not in p.parts and "outputs" not in p.parts]


def test_checkpoint_rng_state_round_trips_as_plain_tensors(tmp_path):
    """The RNG state a checkpoint stores loads with weights_only=True and restores every generator."""
    from pipeline.distributed import _rng_state, _set_rng_state, load_rng_file

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.standard_normal(), torch.rand(1)  # numpy keeps a cached gaussian
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.standard_normal()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _set_rng_state(load_rng_file(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.standard_normal()), float(torch.rand(1))) == expected
    torch.save({"numpy": np.random.get_state()}, tmp_path / "old.pt")  # the pickled format of older versions
    with pytest.raises(ValueError, match="cannot be loaded as plain tensors"):
        load_rng_file(tmp_path / "old.pt")


def test_remote_code_is_off_by_default_and_announced_when_on(tiny_model_dir, tmp_path, capsys):
    from pipeline.main import main

    for recipe in ("tiny", "smollm2", "llama8b", "llama70b"):
        assert load_config([f"recipe={recipe}"]).model.trust_remote_code is False
    main(["recipe=tiny", f"model.base_model={tiny_model_dir}", f"run.output_dir={tmp_path}",
          "model.trust_remote_code=true", "--dry-run"])
    assert "WARNING: model.trust_remote_code=true" in capsys.readouterr().err


def test_the_launch_script_keeps_token_authentication():
    script = (REPO / "launch" / "submit.sh").read_text()
    assert not re.search(r"RAY_AUTH_MODE=disabled", "\n".join(
        line for line in script.splitlines() if not line.lstrip().startswith("#")))
    assert "RAY_AUTH_MODE=token" in script


DEEPSPEED_ROUND_TRIP = r"""
import os, sys, torch, torch.distributed as dist
from pathlib import Path
from pipeline.config import TrainConfig
from pipeline.distributed import init_engine, load_checkpoint, save_checkpoint
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
root = Path(sys.argv[1])
for zero, precision in [(2, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")]:
    cfg = TrainConfig(zero_stage=zero, precision=precision, batch_size=2, lr=1e-2)
    def engine(seed):
        torch.manual_seed(seed)
        return init_engine(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)), cfg, 1, 10)
    a = engine(0)
    from deepspeed.comm import comm
    assert comm.cdb.shm_comm_op is None  # the inference-only shm all-reduce was not JIT-built (skip_shm_all_reduce)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    loss = a(torch.randn(2, 8, dtype=dtype)).float().square().mean()
    a.backward(loss)
    a.step()
    save_checkpoint(a, root / f"z{zero}{precision}", {"step": 1})
    b = engine(1)
    assert load_checkpoint(b, root / f"z{zero}{precision}")["step"] == 1
    with torch.no_grad():
        x = torch.randn(3, 8, dtype=dtype)
        assert torch.equal(a(x), b(x)), (zero, precision)
    print("ROUNDTRIP", zero, precision, flush=True)
"""


def test_deepspeed_checkpoints_load_with_nothing_unpickled_but_tensors(tmp_path):
    """DeepSpeed's own torch.load calls ask for weights_only=False; our load forces weights_only=True
    (pipeline/distributed.py weights_only_loads) and still restores ZeRO-2/3 checkpoints in fp32 and bf16
    exactly. A checkpoint file holding any other pickled object is refused by name, not unpickled."""
    import os
    import subprocess
    import sys

    from pipeline.distributed import weights_only_loads
    from pipeline.main import free_port

    done = subprocess.run([sys.executable, "-c", DEEPSPEED_ROUND_TRIP, str(tmp_path), str(free_port())], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("ROUNDTRIP") == 4, done.stdout[-3000:]

    hostile = tmp_path / "hostile.pt"
    torch.save({"step": 1, "hook": os.system}, hostile)  # unpickling it would import and keep a callable
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with pytest.raises(ValueError, match="does not load"), weights_only_loads():
        torch.load(hostile, weights_only=False)  # what DeepSpeed asks for
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before  # the process's setting is back
