"""The benchmark suite still runs: `python -m benchmarks.run --quick` on the smallest size.

A smoke test, not a timed test: no figure is asserted, only that every case produced its
tables, the JSON and the plots. XLA's backend optimizations are turned down for this run
(compile time dominates on the tiny model), which changes speed, never what is computed.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ("finetune", "quantized", "merge", "peers")


def test_quick_suite_runs(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    ).strip()
    out, img = tmp_path / "results", tmp_path / "img"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--quick",
        "--size",
        "test",
        "--out",
        str(out),
        "--plots",
        str(img),
        "--name",
        "smoke",
        "--no-peft",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "smoke.json").read_text())
    assert report["mode"] == "quick" and report["machine"]["jax"]
    cases = report["sizes"]["test"]
    assert sorted(cases) == sorted(CASES)
    for name, result in cases.items():
        assert "error" not in result, f"{name}: {result.get('error')}"
    rows = cases["finetune"]["rows"]
    assert {"full", "lora_qv", "lora_all", "whole_tree", "whole_nodon"} <= set(rows)
    assert all(r["ms"] > 0 and len(r["ms_all"]) >= 5 for r in rows.values())
    # A peer that is not installed still has its row, saying so.
    assert set(cases["peers"]["qwix"]) == {
        "lora_jax LoRA",
        "qwix LoRA",
        "lora_jax QLoRA",
        "qwix QLoRA",
    }
    assert "skipped" in cases["peers"]["peft"]

    table = (out / "smoke.md").read_text()
    for title in (
        "LoRA vs full fine-tuning",
        "Trainable subtree vs whole tree",
        "QLoRA vs bf16 LoRA",
        "merge() throughput",
        "Peers",
    ):
        assert title in table
    pngs = sorted(p.name for p in img.glob("*.png"))
    assert len(pngs) == 5, pngs  # finetune, subtree, quantized, merge, peers


def test_benchmarks_write_outside_the_tracked_files():
    """A run with no --out writes under runs/benchmarks/ (ignored by git), never over the
    committed benchmarks/results/; plots only where --plots says."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import run

    args = run.parse([])
    assert pathlib.Path(args.out) == pathlib.Path("runs/benchmarks") and args.plots is None
    assert "runs/" in (ROOT / ".gitignore").read_text().split()  # ignored by git


def test_the_gpu_stages_standalone_scripts_run_at_toy_sizes(tmp_path):
    """benchmarks/gpu.sh's standalone stages (qmatmul, multi, variants, seqscale) run end to
    end at toy sizes on CPU, so a GPU loan never finds one broken."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import multi_adapter, qmatmul, seqscale, variants

    qmatmul.main(
        ["--ms", "1", "--k", "64", "--n", "64", "--runs", "5", "--json", str(tmp_path / "q.json")]
    )
    assert json.loads((tmp_path / "q.json").read_text())["correct"]
    report = multi_adapter.main(
        [
            "--hidden",
            "64",
            "--layers",
            "1",
            "--seq",
            "8",
            "--runs",
            "5",
            "--adapters",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert set(report["shapes"]) == {"64x8", "64x1"}
    result = variants.main(["--size", "test", "--runs", "5", "--out", str(tmp_path)])
    assert set(result["rows"]) == {"lora", "dora", "pissa"}
    args = ["--size", "test", "--seqs", "16,32", "--remat", "none,block", "--out", str(tmp_path)]
    result = seqscale.main([*args, "--plot", str(tmp_path / "seqscale.png")])
    assert (tmp_path / "seqscale.png").exists() or importlib.util.find_spec("matplotlib") is None
    saved = json.loads((tmp_path / "seqscale-test.json").read_text())
    assert set(saved["rows"]) == {"none", "block"}
    assert all(set(saved["rows"][p]) == {"16", "32"} for p in saved["rows"])
    assert all(r["tokens_per_s"] > 0 for p in result["rows"].values() for r in p.values())


def test_seqscale_records_out_of_memory_and_skips_longer_lengths(tmp_path, monkeypatch):
    """A length that does not fit is a row saying so; longer ones under that policy are
    skipped, other policies go on; other errors are raised."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import seqscale

    real = seqscale.lora_step

    def tight(lora_model, params, batch, loss):
        if batch.shape[1] > 17 and lora_model.model.cfg.remat is False:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return real(lora_model, params, batch, loss)

    monkeypatch.setattr(seqscale, "lora_step", tight)
    args = ["--size", "test", "--seqs", "16,32,64", "--remat", "none,block", "--out", str(tmp_path)]
    rows = seqscale.main(args)["rows"]
    assert "tokens_per_s" in rows["none"]["16"] and rows["none"]["32"]["error"] == "out of memory"
    assert "skipped" in rows["none"]["64"] and "tokens_per_s" in rows["block"]["64"]
    assert "out of memory" in seqscale.markdown(
        json.loads((tmp_path / "seqscale-test.json").read_text())
    )
    monkeypatch.setattr(seqscale, "lora_step", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        seqscale.main(args)
