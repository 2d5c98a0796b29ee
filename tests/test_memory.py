"""lora_jax.memory: exact parameter, adapter and optimizer-state bytes against real arrays, the
orderings the estimate must show, one compiled check, the CLI and its errors. Tiny models only
(the whole file runs in seconds)."""

import contextlib
import dataclasses
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import memory
from lora_jax.memory import DEFAULT_LORA, MemoryEstimate, estimate_memory
from lora_jax.models import Llama, LlamaConfig

TINY = LlamaConfig.tiny(num_layers=3)  # three layers: the terms come from 1 and 2, extrapolated
B, S = 2, 16
# Adapters on q_proj and o_proj (one kernel shape, so the real 4-bit kernels compile once).
QO = dataclasses.replace(DEFAULT_LORA, targets=("q_proj", "o_proj"))
QO_4BIT = dataclasses.replace(QO, quantize=lj.QuantConfig(compute_dtype=jnp.float32))


def estimate(mode="lora", lora=QO, opt="adamw", remat=None):
    """One estimate of the tiny model, made once per arguments (estimates are pure)."""
    return _estimate(mode, {"full": None, "lora": lora, "qlora": QO_4BIT}[mode], opt, remat)


@functools.cache
def _estimate(mode, lora, opt, remat):
    tx = {"adamw": optax.adamw(1e-3), "sgd": optax.sgd(1e-3), "adafactor": optax.adafactor()}[opt]
    return estimate_memory(TINY, batch=B, seq=S, mode=mode, lora=lora, optimizer=tx, remat=remat)


def nbytes(tree):
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def real():
    """(trainable, frozen) real arrays of the tiny model by mode. The QLoRA half quantizes the
    LoRA tree's q_proj and o_proj kernels with `lj.quantize` (as `lj.init` would, without
    compiling the model once more)."""
    model = Llama(TINY)
    x = jnp.zeros((B, S), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    base = jax.tree.map(lambda s: np.full(s.shape, 0.02, s.dtype), shapes)
    trainable, frozen = lj.partition(
        lj.init(lj.LoRA(model, QO), jax.random.key(1), x, base_params=base)
    )
    kernels = {
        f"layers_{i}/self_attn/{name}/kernel": (0, 1)
        for i in range(TINY.num_layers)
        for name in QO.targets
    }
    quantized = {**frozen, "params": lj.quantize(frozen["params"], QO_4BIT.quantize, paths=kernels)}
    return {"full": (base, {}), "lora": (trainable, frozen), "qlora": (trainable, quantized)}


@pytest.mark.parametrize(
    "mode, opt",
    [
        ("full", "adamw"),
        ("lora", "adamw"),
        ("qlora", "adamw"),
        ("lora", "sgd"),
        ("full", "adafactor"),
    ],
)
def test_exact_bytes_of_weights_adapters_and_optimizer_state(real, mode, opt):
    tx = {"adamw": optax.adamw(1e-3), "sgd": optax.sgd(1e-3), "adafactor": optax.adafactor()}[opt]
    est = estimate(mode, opt=opt)
    trainable, frozen = real[mode]
    assert est.trainable == est.gradients == nbytes(trainable)
    assert est.base_weights == nbytes(frozen)
    assert est.optimizer_state == nbytes(tx.init(trainable))
    assert est.inputs == 2 * B * S * 4
    assert est.peak == est.persistent + est.temporaries <= est.total


def test_lora_below_full_and_qlora_below_lora():
    full, lora, qlora = (estimate(m) for m in memory.MODES)
    assert full.base_weights == 0 and full.trainable == 4 * TINY.num_params()
    assert lora.trainable < full.trainable and lora.optimizer_state < full.optimizer_state
    assert qlora.base_weights < lora.base_weights and qlora.trainable == lora.trainable
    assert qlora.peak < lora.peak < full.peak


def test_remat_reduces_activations_and_adds_a_recomputed_block():
    plain, remat = estimate(), estimate(remat=True)
    assert remat.activations < plain.activations / 3
    assert remat.workspace > plain.workspace  # one block recomputed in the backward pass


def test_flash_attention_drops_the_score_arrays_only():
    """Without the scores, activations are linear in seq, also at seq == head_dim (16), where
    the queries (batch, seq, heads, head_dim) have two axes of length seq too."""
    cfg = LlamaConfig.tiny(num_layers=1)
    flash = {s: estimate_memory(cfg, batch=1, seq=s, attention="cudnn") for s in (15, 16, 17)}
    xla = estimate_memory(cfg, batch=1, seq=16, attention="xla")
    scores = cfg.num_heads * 16 * 16 * 4  # one float32 (heads, seq, seq) array
    assert xla.activations - flash[16].activations > scores
    steps = [flash[16].activations - flash[15].activations]
    steps.append(flash[17].activations - flash[16].activations)
    assert abs(steps[1] - steps[0]) <= 8, steps


def test_whole_model_trace_when_the_config_tells_layers_apart():
    """A pattern that names one layer cannot be extrapolated from 1 and 2 layers."""
    only0 = dataclasses.replace(QO, rank_pattern={"layers_0/.*": 4})
    est, uniform = estimate(lora=only0), estimate()
    assert 0 < uniform.trainable - est.trainable < uniform.trainable / 3


def test_estimate_within_15_percent_of_the_compiled_peak():
    from benchmarks.memory_check import Case, check

    # Full fine-tuning with SGD compiles fastest; benchmarks/memory_check.py covers the rest.
    row = check(Case("tiny-full", LlamaConfig.tiny(num_layers=1), 2, 32, "full", optimizer="sgd"))
    assert row["state_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert abs(row["peak_ratio"] - 1) <= 0.15, row


def test_reference_sizes_match_the_released_models():
    assert list(memory.REFERENCE) == ["llama_1b", "llama_3b", "llama3_8b", "llama3_70b"]
    assert LlamaConfig.llama_3b().num_params() == 3_212_749_824  # Llama-3.2-3B
    assert LlamaConfig.llama3_70b().num_params() == 70_553_706_496  # Meta-Llama-3-70B


@pytest.fixture(scope="module")
def cli():
    """(printed text, returned estimates) of one CLI run on the 1B shapes."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = memory.main(["--model", "1b", "--seq", "96", "--rank", "8", "--optimizer", "sgd"])
    return out.getvalue(), results


def test_cli_prints_the_three_modes(cli):
    text, results = cli
    assert "llama_1b" in text and "| GiB | full fine-tuning | LoRA | QLoRA (NF4) |" in text
    ests = results["llama_1b"]
    assert set(ests) == {"full", "lora", "qlora"}
    assert all(isinstance(e, MemoryEstimate) for e in ests.values())
    assert ests["full"].optimizer_state == 0  # plain SGD keeps no state
    assert ests["full"].trainable == 2 * LlamaConfig.llama_1b().num_params()


def test_qlora_base_is_about_4_13_bits_per_quantized_weight(cli):
    cfg = LlamaConfig.llama_1b()  # bfloat16; kernels large enough to fill the scale groups
    qlora = cli[1]["llama_1b"]["qlora"]
    h, d, m = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    per_layer = 2 * h * d * (cfg.num_heads + cfg.num_kv_heads) + 3 * h * m
    quantized = cfg.num_layers * per_layer  # every linear layer of the blocks
    dense_rest = 2 * (cfg.num_params() - quantized)  # bfloat16 embeddings and norms
    bits = 8 * (qlora.base_weights - dense_rest) / quantized
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=0.005)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--batch", "0"], "--batch"),
        (["--seq", "x"], "--seq"),
        (["--seq", "100000", "--model", "1b"], "--seq"),
        (["--model", "9b"], "--model"),
        (["--remat", "sometimes"], "--remat"),
        (["--optimizer", "rmsprop2"], "--optimizer"),
        (["--attention", "flash"], "--attention"),
    ],
)
def test_cli_bad_input_is_one_line_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        memory.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"config": "llama"}, TypeError, "config must be a lora_jax.models.LlamaConfig"),
        ({"batch": 0}, ValueError, "batch must be a positive int, got 0"),
        ({"seq": 1000}, ValueError, r"seq must be at most config.max_seq_len \(128\)"),
        ({"mode": "dora"}, ValueError, "mode must be one of"),
        ({"mode": "full", "lora": DEFAULT_LORA}, ValueError, "lora is for modes"),
        (
            {"lora": dataclasses.replace(DEFAULT_LORA, quantize=lj.QuantConfig())},
            ValueError,
            "pass mode='qlora'",
        ),
        ({"lora": {"rank": 8}}, TypeError, "lora must be a lora_jax.LoraConfig"),
        ({"optimizer": "adamw"}, TypeError, "optimizer must be an optax"),
        ({"remat": "sometimes"}, ValueError, "remat must be a bool or one of"),
        ({"attention": "flash"}, ValueError, "attention must be None or one of"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, error, match):
    args = {"config": LlamaConfig.tiny(), "batch": 1, "seq": 8} | kwargs
    with pytest.raises(error, match=match):
        estimate_memory(**args)
