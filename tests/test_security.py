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
