"""Tests for the inits that start from the base weight (`lora_jax.adapters.inits`): PiSSA
(exact and randomized SVD), OLoRA and LoftQ through `lora_jax.init`, on every layer kind;
the checks on configs that make no sense; `quantization_errors` and `to_original_base`.
(PEFT equivalence: tests/test_io_peft.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, randomize_adapters
from test_rules import Holder, _case

import lora_jax as lj
from lora_jax.adapters import inits

QC = lj.QuantConfig(compute_dtype=jnp.float32, block_size=16)


@pytest.mark.parametrize("kind", ["dense", "dense_general", "einsum_batched", "embed", "conv"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_base_inits_start_as_the_base_on_every_kind(kind, init):
    layer, x, _, _ = _case(kind, (2, 5, 4, 3, 2), jnp.float32)
    model = Holder(layer)
    base = model.init(jax.random.key(1), x)
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=2, alpha=3.0, targets=("layer",), init=init))
    params = lj.init(lora_model, jax.random.key(2), x, base_params=base)
    kernel = next(k for k in ("kernel", "embedding") if k in params["params"]["layer"])
    here = params["params"]["layer"]
    assert not np.allclose(here[kernel], base["params"]["layer"][kernel])  # the residual
    assert np.abs(here[f"{kernel}_lora_b"]).max() > 0  # B starts from W, not from zero
    assert_close(lora_model.apply(params, x), model.apply(base, x), jnp.float32)
    assert_close(model.apply(lj.merge(params), x), model.apply(base, x), jnp.float32)


def test_randomized_svd_finds_the_top_subspace():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    s = 2.0 ** -np.arange(30)
    w = jnp.asarray((u[:, :30] * s) @ v.T, jnp.float32)
    exact = inits.pissa(w, 4, 0.5)
    fast = inits.pissa(w, 4, 0.5, niter=4, key=jax.random.key(0))
    np.testing.assert_allclose(fast[0] @ fast[1], exact[0] @ exact[1], atol=1e-4)
    np.testing.assert_allclose(fast[2] + 0.5 * fast[0] @ fast[1], w, atol=1e-5)


def test_loftq_lowers_the_quantization_error():
    rng = np.random.default_rng(1)
    w = (
        rng.standard_normal((64, 48))
        @ np.diag(2.0 ** -np.arange(48) * 4)
        @ rng.standard_normal((48, 48))
    )  # a decaying spectrum, as pretrained weights have
    net = Holder(_dense(48))
    x = jnp.ones((2, 64))
    base = {"params": {"layer": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.zeros(48)}}}
    errors = {}
    for init, iters in (("kaiming", 1), ("loftq", 1), ("loftq", 4)):
        cfg = lj.LoraConfig(rank=4, targets=("layer",), init=init, quantize=QC, loftq_iter=iters)
        params = lj.init(lj.LoRA(net, cfg), jax.random.key(0), x, base_params=base)
        errors[init, iters] = lj.quantization_errors(params, base)["layer/kernel"]
    plain, start = errors["kaiming", 1]
    assert plain == pytest.approx(start)  # QLoRA starts at the plain quantization error
    assert errors["loftq", 1][0] == pytest.approx(plain)
    assert errors["loftq", 1][1] < 0.8 * plain  # the adapter absorbs the top of the error
    assert errors["loftq", 4][1] <= errors["loftq", 1][1] * 1.01


def _dense(features):
    import flax.linen as nn

    return nn.Dense(features)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(init="loftq"), r"init='loftq'\) is for a 4-bit base: set LoraConfig.quantize"),
        (dict(init="pissa", quantize=QC), r"init='pissa'\) replaces the base by a residual"),
        (dict(init="pissa_niter_4", quantize=QC), r"init='pissa_niter_4'\) replaces the base"),
        (dict(init="olora", variant="dora"), r"init='olora'\) is defined for variant='lora'"),
        (dict(init="pissa_niter_x"), r"init must be one of .* or 'pissa_niter_<n>'"),
        (dict(loftq_iter=0), r"loftq_iter must be a positive int"),
    ],
)
def test_configs_that_make_no_sense_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        lj.LoraConfig(**fields)


def test_conflicts_and_conversions_are_named():
    net, x = Holder(_dense(8)), jnp.ones((2, 16))
    base = net.init(jax.random.key(0), x)
    pissa = lj.LoraConfig(rank=2, targets=("layer",), init="pissa")
    two = lj.LoRA(net, {"p": pissa, "o": lj.LoraConfig(rank=2, targets=("layer",), init="olora")})
    with pytest.raises(ValueError, match=r"adapters 'o' and 'p' both start from the base weight"):
        lj.init(two, jax.random.key(1), x, base_params=base)
    plain = lj.LoraConfig(rank=2, targets=("layer",))
    params = lj.init(lj.LoRA(net, plain), jax.random.key(1), x, base_params=base)
    with pytest.raises(ValueError, match=r"did not change the base: save the adapter as it is"):
        lj.to_original_base(params, lj.partition(params)[0], plain)
    params = lj.init(lj.LoRA(net, pissa), jax.random.key(1), x, base_params=base)
    initial = jax.tree.map(jnp.copy, lj.partition(params)[0])
    trained = randomize_adapters(params, jax.random.key(2))
    converted, cfg = lj.to_original_base(trained, initial, pissa)
    assert (cfg.rank, cfg.alpha) == (4, 2 * pissa.alpha)
    np.testing.assert_allclose(
        converted["params"]["layer"]["kernel"], base["params"]["layer"]["kernel"], atol=1e-6
    )
    assert_close(
        lj.LoRA(net, cfg).apply(converted, x), lj.LoRA(net, pissa).apply(trained, x), jnp.float32
    )
    quantized = lj.init(
        lj.LoRA(net, lj.LoraConfig(rank=2, targets=("layer",), quantize=QC)),
        jax.random.key(1),
        x,
        base_params=base,
    )
    loftq = lj.LoraConfig(rank=2, targets=("layer",), init="loftq", quantize=QC)
    with pytest.raises(ValueError, match=r"starts from the dense weight of 'layer/kernel', but"):
        lj.init(
            lj.LoRA(net, loftq),
            jax.random.key(1),
            x,
            base_params=lj.merge(quantized, requantize=True)[0],
        )


@pytest.mark.filterwarnings("ignore:LoraConfig. a rank above:UserWarning")
def test_base_inits_name_what_they_cannot_do():
    net, x = Holder(_dense(4)), jnp.ones((2, 16))
    base = net.init(jax.random.key(0), x)
    big = lj.LoraConfig(rank=8, targets=("layer",), init="olora")
    with pytest.raises(
        ValueError, match=r"'layer/kernel': rank 8 exceeds min\(fan_in, fan_out\) = 4"
    ):
        lj.init(lj.LoRA(net, big), jax.random.key(1), x, base_params=base)


def test_loftq_needs_every_adapted_kernel_quantized():
    from lora_jax.models import Llama, LlamaConfig

    model, x = Llama(LlamaConfig.tiny(num_layers=1)), jnp.zeros((1, 8), jnp.int32)
    qc = lj.QuantConfig(block_size=16, targets=("v_proj",))
    cfg = lj.LoraConfig(rank=2, targets=("q_proj", "v_proj"), init="loftq", quantize=qc)
    with pytest.raises(ValueError, match=r"q_proj/kernel': LoftQ fits an adapter to a 4-bit"):
        lj.init(
            lj.LoRA(model, cfg), jax.random.key(1), x, base_params=model.init(jax.random.key(0), x)
        )


def test_to_original_base_converts_the_named_adapter_only():
    net, x = Holder(_dense(8)), jnp.ones((2, 16))
    base = net.init(jax.random.key(0), x)
    cfgs = {"a": lj.LoraConfig(rank=2, targets=("layer",), init="pissa"),
            "z": lj.LoraConfig(rank=2, targets=("layer",))}  # fmt: skip
    params = lj.init(lj.LoRA(net, cfgs), jax.random.key(1), x, base_params=base)
    initial = jax.tree.map(jnp.copy, lj.partition(params)[0])
    with pytest.raises(ValueError, match=r"holds adapters \['a', 'z'\]: pass name="):
        lj.to_original_base(params, initial, cfgs["a"])
    converted, _ = lj.to_original_base(params, initial, cfgs["a"], name="a")
    here = converted["params"]["layer"]
    np.testing.assert_allclose(here["kernel"], base["params"]["layer"]["kernel"], atol=1e-6)
    assert here["kernel_lora_a@a"].shape == (16, 4) and here["kernel_lora_a@z"].shape == (16, 2)
