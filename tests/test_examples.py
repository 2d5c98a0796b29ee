"""The main example runs end to end (tiny settings) and fine-tunes on user text."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finetune_lm():
    spec = importlib.util.spec_from_file_location(
        "finetune_lm", ROOT / "examples" / "finetune_lm.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune_lm"] = module
    spec.loader.exec_module(module)
    return module


def test_finetune_lm_on_user_data(finetune_lm, tmp_path):
    data = tmp_path / "poem.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    args = [
        "--model",
        "tiny",
        "--base-steps",
        "5",
        "--steps",
        "30",
        "--batch",
        "4",
        "--seq",
        "32",
        "--rank",
        "4",
        "--targets",
        "q_proj,v_proj",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--lr",
        "1e-2",
        "--ckpt-every",
        "10",
    ]
    result = finetune_lm.main(args)
    assert result["after"] < result["before"]
    assert result["merge_diff"] < 1e-4
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())["lora_config"]
    assert config["rank"] == 4 and config["targets"] == ["q_proj", "v_proj"]
    assert (adapter / "adapter.safetensors").stat().st_size > 0
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0

    # Interrupted after step 20: --resume continues from there to the very same result.
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["20", "30"]
    shutil.rmtree(checkpoints / "30")
    resumed = finetune_lm.main([*args, "--resume"])
    assert resumed["resumed_from"] == 20 and resumed["after"] == result["after"]


def test_docstring_corpus_is_prose(finetune_lm):
    files = finetune_lm.stdlib_files()[:40]
    prose, code = finetune_lm.docstring_corpus(files), finetune_lm.code_corpus(files)
    assert len(prose) > 10_000 and b"def " in code
    assert prose.count(b"def ") < code.count(b"def ") / 10


def test_qlora_finetune_on_user_data(finetune_lm, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "qlora_finetune", ROOT / "examples" / "qlora_finetune.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = tmp_path / "poem.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    result = module.main(
        [
            "--model",
            "tiny",
            "--base-steps",
            "3",
            "--steps",
            "20",
            "--batch",
            "4",
            "--seq",
            "32",
            "--rank",
            "4",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--lr",
            "1e-2",
        ]
    )
    assert result["after"] < result["before"]
    assert result["merge_diff"] < 1e-4
    assert result["bits_per_weight"] < 4.5  # tiny kernels: padding of the 256-scale blocks
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").stat().st_size > 0
