"""Sharded LoRA: adapter specs follow their kernel, and sharded runs equal single-device ones.

Adapters derive their specs from the kernel they adapt (explicit specs or logical boxes, which
survive init, partition, a train step and merge); a tensor-parallel forward pass and greedy
generation equal the unsharded ones token for token (another library once sharded A and B
unlike the base and produced garbage after the first token); the mesh train step equals the
single-device step on data-parallel, FSDP and tensor-parallel meshes and keeps every declared
sharding; 4-bit kernels keep their logical boxes and train on a mesh; bad meshes, rules and
batches fail with messages naming the axis or leaf; and two processes on localhost train
like one.
"""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import QC, leaves_by_path, randomize_adapters
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax._trees import unbox_tree as unbox
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py asks for 8 CPU devices)"
)

ROOT = Path(__file__).resolve().parents[1]
IDS = jax.random.randint(jax.random.key(0), (8, 17), 0, 256)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TP = (("heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "model"))
LOSS = lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:])


def _mesh(shape, names):
    return jax.make_mesh(shape, names, devices=jax.devices()[:8])


@pytest.fixture(scope="module")
def llama():
    """The tiny decoder with logical axis annotations and LoRA (dropout 0.1) on every linear
    layer: (model, base variables, LoRA model, LoRA variables). Never donate these."""
    model = Llama(LlamaConfig.tiny(logical_axes=True))
    base = jax.jit(model.init)(jax.random.key(1), IDS[:, :-1])
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=4, targets=ALL_LINEAR, dropout=0.1))
    return model, base, lora_model, lj.init(lora_model, jax.random.key(2), IDS, base_params=base)


def _specs(tree):
    return {k: tuple(v) for k, v in leaves_by_path(tree).items()}


class Experts(nn.Module):
    """A multi-axis DenseGeneral (in, heads, head_dim) and an Einsum with a batch axis."""

    @nn.compact
    def __call__(self, x):  # x: (examples, experts, in)
        h = nn.DenseGeneral((4, 2), name="heads")(x)  # kernel (6, 4, 2)
        h = h.reshape(*h.shape[:-2], 8)
        return nn.Einsum((4, 8, 6), "nbi,bio->nbo", use_bias=False, name="experts")(h)


class Heads(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral((4, 2), name="heads")(x)  # kernel (6, 4, 2)


# ----------------------------------------------------------------------------- specs


def test_adapter_specs_follow_the_kernel():
    x = jnp.ones((2, 4, 6))
    base = Experts().init(jax.random.key(0), x)
    lora_model = lj.LoRA(Experts(), lj.LoraConfig(rank=2, targets=("heads", "experts")))
    params = lj.init(lora_model, jax.random.key(1), x, base_params=base)
    base_specs = {
        "heads": {"kernel": P("fsdp", "model"), "bias": P("model")},
        "experts": {"kernel": P("expert", None, "model")},
    }
    specs = _specs(lj.partition_specs(params, base_specs))
    assert specs["params/heads/kernel"] == ("fsdp", "model", None)  # padded to the leaf's rank
    assert specs["params/heads/kernel_lora_a"] == ("fsdp", None)  # (in, rank)
    assert specs["params/heads/kernel_lora_b"] == (None, "model", None)  # (rank, heads, head_dim)
    assert specs["params/heads/bias"] == ("model", None)
    assert specs["params/experts/kernel_lora_a"] == ("expert", None, None)  # (batch, in, rank)
    assert specs["params/experts/kernel_lora_b"] == ("expert", None, "model")  # (batch, rank, out)
    assert "lora/heads/kernel_lora" not in specs  # records hold no arrays: no spec
    # The same from a variables dict, from NamedShardings, and with the adapters' own specs.
    mesh = _mesh((2, 2, 2), ("fsdp", "model", "expert"))
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), {"params": base_specs})
    for given in ({"params": base_specs}, named, lj.partition_specs(params, base_specs)):
        assert _specs(lj.partition_specs(params, given)) == specs
    shardings = lj.param_shardings(params, mesh, base_specs)
    a = shardings["params"]["experts"]["kernel_lora_a"]
    assert a.mesh.shape == mesh.shape and tuple(a.spec) == ("expert", None, None)


def test_logical_boxes_give_adapter_names_and_survive_init_partition_and_merge(llama):
    _model, base, _lora_model, params = llama
    q = params["params"]["layers_0"]["self_attn"]["q_proj"]
    assert isinstance(q["kernel_lora_a"], nn.LogicallyPartitioned)
    assert q["kernel_lora_a"].names == ("embed", None)  # the rank axis is replicated
    assert q["kernel_lora_b"].names == (None, "heads")
    assert q["kernel"] is base["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    specs = _specs(lj.partition_specs(params))  # read from the boxes
    assert specs["params/layers_0/mlp/down_proj/kernel_lora_a"] == ("mlp", None)
    assert specs["params/embed_tokens/embedding"] == ("vocab", "embed")
    assert specs == _specs(lj.partition_specs(params, nn.get_partition_spec(base)))
    trainable, _frozen = lj.partition(params)
    assert trainable["params"]["layers_1"]["mlp"]["up_proj"]["kernel_lora_b"].names == (None, "mlp")
    merged = lj.merge(randomize_adapters(params, jax.random.key(3)))
    chex.assert_trees_all_equal_structs(merged, base)
    for path, box in leaves_by_path(merged).items():
        assert box.names == leaves_by_path(base)[path].names, path


def test_param_shardings_map_logical_names_to_mesh_axes(llama):
    params = llama[3]
    shardings = lj.param_shardings(
        params, _mesh((2, 4), ("data", "model")), rules=(("batch", "data"), *TP)
    )
    flat = {k: tuple(v.spec) for k, v in leaves_by_path(shardings).items()}
    assert flat["params/layers_0/self_attn/q_proj/kernel"] == (None, "model")
    assert flat["params/layers_0/self_attn/q_proj/kernel_lora_a"] == (None, None)
    assert flat["params/layers_0/self_attn/q_proj/kernel_lora_b"] == (None, "model")
    assert flat["params/layers_0/self_attn/o_proj/kernel_lora_a"] == ("model", None)
    assert flat["params/embed_tokens/embedding"] == ("model", None)
    assert not any(k.startswith("lora/") for k in flat)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda p: lj.partition_specs(p, {"heads": {"kernel": P()}}),
            r"Leaf 'params/heads/bias' has no sharding spec",
        ),
        (
            lambda p: lj.partition_specs(p, {"heads": {"kernel": P(), "bias": P(), "gate": P()}}),
            r"Leaf 'params/heads/gate' has a sharding spec but is not a leaf of the params",
        ),
        (
            lambda p: lj.partition_specs(
                p, {"heads": {"kernel": P(None, None, None, "x"), "bias": P()}}
            ),
            r"Leaf 'params/heads/kernel' has 3 axes \(shape \(6, 4, 2\)\) but its spec",
        ),
        (
            lambda p: lj.partition_specs(
                p, {"heads": {"kernel": P("x"), "bias": P(), "kernel_lora_a": P(None, "x")}}
            ),
            r"Adapter 'params/heads/kernel_lora_a' has spec P\(None, 'x'\) but its "
            r"kernel's spec P\('x', None, None\) gives P\('x', None\)",
        ),
        (
            lambda p: lj.param_shardings(
                p, _mesh((8,), ("x",)), {"heads": {"kernel": P("x"), "bias": P()}}
            ),
            r"Leaf 'params/heads/kernel' has shape \(6, 4, 2\): dimension 0 \(6\) is not divisible by "
            r"the 8 devices of mesh axes \('x',\)",
        ),
        (
            lambda p: lj.param_shardings(
                p, _mesh((8,), ("x",)), {"heads": {"kernel": P("embed"), "bias": P()}}
            ),
            r"The specs name mesh axes \['embed'\] that the mesh lacks \(its axes are \('x',\)\), e\.g\. "
            r"leaf 'params/heads/kernel' P\('embed', None, None\)\. Logical axis names .* need rules=",
        ),
        (
            lambda p: lj.param_shardings(p, _mesh((8,), ("x",)), rules=(("embed", "model"),)),
            r"Logical axis rule \('embed', 'model'\) maps to mesh axis 'model', but the mesh's axes "
            r"are \('x',\)",
        ),
    ],
    ids=[
        "missing",
        "unknown",
        "too-long",
        "inconsistent-adapter",
        "indivisible",
        "logical-without-rules",
        "rule-axis",
    ],
)
def test_spec_errors_name_the_leaf(make, match):
    lora_model = lj.LoRA(Heads(), lj.LoraConfig(rank=4, targets=("heads",)))
    params = lj.init(lora_model, jax.random.key(0), jnp.ones((2, 6)))
    with pytest.raises(ValueError, match=match):
        make(params)


# ------------------------------------------------------------- sharded forward pass


def test_tensor_parallel_forward_and_greedy_generation_equal_unsharded(llama):
    _, _, lora_model, params = llama
    params = randomize_adapters(params, jax.random.key(3), scale=0.2)
    prompt, new = IDS[:2, :4], 8

    def generate(params, tokens):
        buffer = jnp.zeros((2, 4 + new), jnp.int32).at[:, :4].set(tokens)

        def body(t, buffer):
            logits = lora_model.apply(params, buffer)
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, 1, False), -1)
            return jax.lax.dynamic_update_index_in_dim(buffer, nxt.astype(jnp.int32), t, 1)

        buffer = jax.lax.fori_loop(4, 4 + new, body, buffer)
        return buffer, lora_model.apply(params, buffer)

    values = unbox(params)
    expected_tokens, expected_logits = jax.jit(generate)(values, prompt)
    mesh = _mesh((2, 4), ("data", "model"))
    shardings = lj.param_shardings(params, mesh, rules=(*TP, ("embed", "data")))
    sharded = lj.shard(values, shardings)
    assert tuple(
        sharded["params"]["layers_1"]["mlp"]["down_proj"]["kernel_lora_a"].sharding.spec
    ) == ("model", None)
    tokens, logits = jax.jit(generate, in_shardings=(shardings, None))(sharded, prompt)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_allclose(logits, expected_logits, atol=2e-5, rtol=1e-5)
    assert len(set(np.asarray(tokens[:, 4:]).ravel())) > 2  # a real sequence, not one token


# ----------------------------------------------------------------- mesh train step

STEPS = 3
CASES = {
    "dp+fsdp (8,)": ((8,), ("data",), (("batch", "data"), ("embed", "data"))),
    "dp+tp (2, 4), PartitionSpecs": ((2, 4), ("data", "model"), None),
    "fsdp+tp (4, 2)": ((4, 2), ("fsdp", "model"), (("batch", "fsdp"), ("embed", "fsdp"), *TP)),
}


def _tp_specs(base):
    """Mesh-axis specs for the unannotated model: heads and MLP over "model"."""
    column = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    spec = lambda path, _: (
        P(None, "model")
        if path[-2] in column
        else P("model", None)
        if path[-2] in ("o_proj", "down_proj")
        else P()
    )
    return traverse_util.path_aware_map(spec, base)


@pytest.fixture(scope="module")
def reference(llama):
    """Three single-device steps (LoRA dropout on, one key per step): (tx, losses, adapters)."""
    _, _, lora_model, params = llama
    tx = lj.optimizer(optax.adamw(1e-2), params)
    step = lj.make_train_step(lora_model, LOSS, tx, donate=False)
    out, state, losses = params, step.init(params), []
    for i in range(STEPS):
        out, state, loss = step(out, state, IDS, rng=jax.random.key(10 + i))
        losses.append(float(loss))
    return tx, losses, unbox(lj.partition(out)[0])


@pytest.mark.parametrize("case", CASES)
def test_sharded_steps_equal_single_device_and_keep_their_shardings(llama, reference, case):
    shape, names, rules = CASES[case]
    _, base, lora_model, params = llama
    tx, losses, expected = reference
    mesh = _mesh(shape, names)
    specs = None  # from the logical boxes, with the rules
    if rules is None:  # the same values without boxes, mesh-axis specs for the base
        params, specs = unbox(params), _tp_specs(unbox(base))
    step = lj.make_train_step(lora_model, LOSS, tx, mesh=mesh, rules=rules, param_shardings=specs)
    params = step.shard(jax.tree.map(jnp.copy, params))  # the step donates its inputs
    opt_state = step.init(params)
    declared = (step.param_shardings(params), step.state_shardings(params))
    got = []
    for i in range(STEPS):
        for tree, shardings in zip((unbox(params), opt_state), declared, strict=True):
            for leaf, sharding in zip(
                jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True
            ):
                assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (
                    leaf.sharding,
                    sharding,
                )
        params, opt_state, loss = step(
            params, opt_state, np.asarray(IDS), rng=jax.random.key(10 + i)
        )
        got.append(float(loss))
    np.testing.assert_allclose(got, losses, rtol=1e-5)
    chex.assert_trees_all_close(unbox(lj.partition(params)[0]), expected, atol=5e-5)
    assert any(any(s.spec) for s in jax.tree.leaves(declared[0])), "nothing was sharded"
    b = params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel_lora_b"]
    assert isinstance(b, nn.LogicallyPartitioned) == (rules is not None)  # boxes survive


def test_mesh_step_errors_say_what_differs(llama, reference):
    _, _, lora_model, params = llama
    tx = reference[0]
    with pytest.raises(
        ValueError,
        match=r"Logical axis rule \('heads', 'model'\) maps to mesh "
        r"axis 'model', but the mesh's axes are \('data', 'tp'\)",
    ):
        lj.make_train_step(
            lora_model,
            LOSS,
            tx,
            mesh=_mesh((2, 4), ("data", "tp")),
            rules=(("batch", "data"), *TP),
        )
    step = lj.make_train_step(
        lora_model,
        LOSS,
        tx,
        mesh=_mesh((2, 4), ("data", "tp")),
        rules=(("batch", "data"), ("embed", "data")),
    )
    with pytest.raises(
        ValueError,
        match=r"Mesh axes \['tp'\] \(mesh \{'data': 2, 'tp': 4\}\) "
        r"shard no parameter and not the batch .*the rules map logical axes to "
        r"mesh axes \['data'\] only",
    ):
        step.init(params)
    step = lj.make_train_step(
        lora_model, LOSS, tx, mesh=_mesh((8,), ("data",)), rules=(("batch", "data"),)
    )
    with pytest.raises(
        ValueError,
        match=r"Batch leaf 'batch' has shape \(6, 17\): dimension 0 "
        r"\(6\) is not divisible by the 8 devices of mesh axes \('data',\)",
    ):
        step(params, step.init(params), IDS[:6])
    with pytest.raises(ValueError, match=r"got rules, batch_sharding but no mesh"):
        lj.make_train_step(lora_model, LOSS, tx, rules=TP, batch_sharding=P("data"))
    with pytest.raises(ValueError, match=r"rules map no logical axis 'batch' and the mesh"):
        lj.make_train_step(lora_model, LOSS, tx, mesh=_mesh((8,), ("x",)), rules=(("embed", "x"),))


def test_quantization_keeps_logical_boxes_and_trains_on_a_mesh():
    model = Llama(LlamaConfig.tiny(num_layers=1, logical_axes=True))
    tokens = jax.random.randint(jax.random.key(45), (2, 17), 0, 256)
    base = jax.jit(model.init)(jax.random.key(46), tokens[:, :-1])
    cfg = lj.LoraConfig(targets=("q_proj", "v_proj"), quantize=QC(block_size=32))
    lora = lj.LoRA(model, cfg)
    params = lj.init(lora, jax.random.key(47), tokens[:, :-1], base_params=base)
    q = params["params"]["layers_0"]["self_attn"]["q_proj"]
    assert isinstance(q["kernel"], nn.LogicallyPartitioned) and isinstance(
        q["kernel"].value, lj.QuantizedTensor
    )
    assert q["kernel_lora_b"].names == (None, "heads")
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    loss = lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:])
    step = lj.make_train_step(lora, loss, optax.adam(1e-2), mesh=mesh, rules=(("batch", "data"),))
    state = step.init(params)
    params, state, value = step(params, state, tokens)
    assert np.isfinite(float(value))
    kernel = lj._trees.unbox_tree(params)["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.codes.sharding.mesh.shape == {"data": 2}


# ------------------------------------------------------------------------ multi-host


def _example():
    spec = importlib.util.spec_from_file_location(
        "multihost_finetune", ROOT / "examples" / "multihost_finetune.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_train_like_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--model", "tiny", "--steps", "3", "--batch", "8", "--seq", "16", "--rank", "4"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "examples" / "multihost_finetune.py"),
                *flags,
                "--cpu-devices",
                "2",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--out",
                str(tmp_path / "out.npz"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        example = _example()
        expected = example.run(example.parse_args(flags), mesh=None)  # one process, one device
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "2 processes, 4 devices" in outputs[0]
    got = np.load(tmp_path / "out.npz")
    assert set(got.files) == set(expected)
    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-5)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-4, err_msg=key)
