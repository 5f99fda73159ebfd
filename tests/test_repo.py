"""The repo's promises to a new user: README commands == CI commands; launch scripts are valid."""

import importlib.util
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
            and not line.startswith(("set ", "cd "))]


def test_ci_runs_exactly_the_readme_setup_and_test_commands():
    ci = _commands((REPO / ".ci" / "run").read_text())
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    setup, test, run = _commands(quick_start)
    assert ci == [setup, test]
    assert "pytest" in test and "pipeline.main recipe=smollm2" in run  # the main job: the real model


def test_launch_scripts_parse_and_their_python_targets_exist():
    scripts = [*(REPO / "launch").glob("*.sh"), *(REPO / "launch").glob("*.sbatch")]
    assert {p.name for p in scripts} >= {"submit.sh", "slurm.sbatch"}
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
        _targets_exist(script.name, script.read_text())
    slurm = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=" in slurm and "ray start --head" in slurm and "ray start --address" in slurm


def test_kuberay_rayjob_is_a_valid_rayjob_running_the_pipeline():
    import yaml

    job = yaml.safe_load((REPO / "launch" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    _targets_exist("rayjob.yaml", spec["entrypoint"])
    recipe = re.search(r"recipe=(\w+)", spec["entrypoint"]).group(1)
    assert (REPO / "recipes" / f"{recipe}.yaml").is_file()
    pods = [spec["rayClusterSpec"]["headGroupSpec"]] + spec["rayClusterSpec"]["workerGroupSpecs"]
    for pod in pods:  # every pod sees the run directory
        (container,) = pod["template"]["spec"]["containers"]
        assert any(m["mountPath"] == "/mnt/shared" for m in container["volumeMounts"])
    assert "/mnt/shared" in spec["entrypoint"]


def _targets_exist(name: str, text: str) -> None:
    modules = re.findall(r"python3? -m ([\w.]+)", text)
    assert modules, f"{name} runs no python -m target"
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"{name} calls missing {module}"


def test_tiny_base_model_is_committed_and_small():
    model_dir = REPO / "data" / "tiny_base"
    weights = list(model_dir.glob("*.safetensors"))
    assert weights and sum(w.stat().st_size for w in weights) < 25 * 2**20
    assert (model_dir / "README.md").is_file() and (model_dir / "tokenizer.json").is_file()
