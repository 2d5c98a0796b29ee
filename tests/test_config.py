"""LoraConfig: validation messages, target matching, per-path rank/alpha/scale; QuantConfig:
validation messages."""

import dataclasses
import math

import jax.numpy as jnp
import pytest

import lora_jax as lj


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), r"LoraConfig.rank must be a positive int, got 0"),
        (dict(rank=-2), r"LoraConfig.rank .* got -2"),
        (dict(rank=2.5), r"LoraConfig.rank .* got 2.5"),
        (dict(rank=True), r"LoraConfig.rank .* got True"),
        (dict(alpha=0), r"LoraConfig.alpha must be a positive finite number, got 0"),
        (dict(alpha=-1.0), r"LoraConfig.alpha .* got -1.0"),
        (dict(alpha=float("inf")), r"LoraConfig.alpha must be a positive finite number, got inf"),
        (dict(alpha=float("nan")), r"LoraConfig.alpha .* got nan"),
        (
            dict(alpha_pattern={"v_proj": float("inf")}),
            r"LoraConfig.alpha_pattern\['v_proj'\] .* got inf",
        ),
        (dict(dropout=1.0), r"LoraConfig.dropout must be in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), r"LoraConfig.dropout .* got -0.1"),
        (
            dict(targets="q_proj("),
            r"LoraConfig.targets has an invalid regular expression 'q_proj\('",
        ),
        (dict(exclude="[a"), r"LoraConfig.exclude has an invalid regular expression"),
        (dict(targets=()), r"LoraConfig.targets is empty"),
        (
            dict(rank_pattern={"q(": 4}),
            r"LoraConfig.rank_pattern has an invalid regular expression 'q\('",
        ),
        (
            dict(rank_pattern={"q_proj": 0}),
            r"LoraConfig.rank_pattern\['q_proj'\] must be a positive int, got 0",
        ),
        (dict(alpha_pattern={"v_proj": -3}), r"LoraConfig.alpha_pattern\['v_proj'\] .* got -3"),
        (
            dict(init="xavier"),
            r"LoraConfig.init must be one of \('kaiming', 'gaussian', 'pissa', 'olora', 'loftq'\) or 'pissa_niter_<n>', got 'xavier'",
        ),
        (dict(param_dtype=jnp.int32), r"LoraConfig.param_dtype must be a floating dtype"),
        (dict(trainable=("lm_head(",)), r"LoraConfig.trainable has an invalid regular expression"),
    ],
)
def test_bad_values_name_field_and_value(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lj.LoraConfig(**kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match=r"LoraConfig.targets must be a regex string or a sequence"):
        lj.LoraConfig(targets=("q_proj", 3))
    with pytest.raises(TypeError, match=r"LoraConfig.use_rslora must be a bool"):
        lj.LoraConfig(use_rslora="yes")
    with pytest.raises(TypeError, match=r"LoraConfig.rank_pattern must be a mapping"):
        lj.LoraConfig(rank_pattern=5)


def test_keyword_only_frozen_hashable():
    with pytest.raises(TypeError):
        lj.LoraConfig(8)  # keyword-only
    cfg = lj.LoraConfig(targets=["q_proj", "v_proj"], rank_pattern={"q_proj": 4})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 4
    assert cfg.targets == ("q_proj", "v_proj")
    assert hash(cfg) == hash(
        lj.LoraConfig(targets=("q_proj", "v_proj"), rank_pattern={"q_proj": 4})
    )


def test_name_targets_match_last_components():
    cfg = lj.LoraConfig(targets=("q_proj", "mlp/down_proj"))
    assert cfg.is_target("layers_0/self_attn/q_proj")
    assert cfg.is_target("q_proj")
    assert cfg.is_target("layers_3/mlp/down_proj")
    assert not cfg.is_target("layers_0/self_attn/q_proj_extra")
    assert not cfg.is_target("layers_0/self_attn/xq_proj")
    assert not cfg.is_target("layers_0/down_proj")


def test_regex_targets_full_match_and_exclude():
    cfg = lj.LoraConfig(targets=r"layers_\d+/self_attn/(q|v)_proj", exclude=r"layers_0/.*")
    assert cfg.is_target("layers_1/self_attn/q_proj")
    assert not cfg.is_target("layers_0/self_attn/q_proj")  # excluded
    assert not cfg.is_target("model/layers_1/self_attn/q_proj")  # full match, not search
    named = lj.LoraConfig(targets=("q_proj", "v_proj"), exclude=("layers_1/self_attn/v_proj",))
    assert named.is_target("layers_1/self_attn/q_proj")
    assert not named.is_target("layers_1/self_attn/v_proj")


def test_patterns_first_match_wins_and_scale():
    cfg = lj.LoraConfig(
        rank=8,
        alpha=16.0,
        rank_pattern={r"layers_0/.*": 2, "q_proj": 4},
        alpha_pattern={"v_proj": 4.0},
    )
    assert cfg.rank_for("layers_0/self_attn/q_proj") == 2  # first pattern wins
    assert cfg.rank_for("layers_1/self_attn/q_proj") == 4
    assert cfg.rank_for("layers_1/self_attn/k_proj") == 8
    assert cfg.scale_for("layers_1/self_attn/v_proj") == 4.0 / 8
    assert cfg.scale_for("layers_1/self_attn/q_proj") == 16.0 / 4
    rs = lj.LoraConfig(rank=16, alpha=8.0, use_rslora=True)
    assert rs.scale_for("anything") == pytest.approx(8.0 / math.sqrt(16))


def test_pattern_key_matching_no_target_is_an_error():
    cfg = lj.LoraConfig(targets=("q_proj",), rank_pattern={"k_proj": 2})
    with pytest.raises(
        ValueError, match=r"rank_pattern key 'k_proj' matches none of the targeted modules"
    ):
        cfg.check_patterns(["layers_0/self_attn/q_proj"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fmt="nf3"), "QuantConfig.fmt"),
        (dict(block_size=48), "QuantConfig.block_size"),
        (dict(block_size=1), "QuantConfig.block_size"),
        (dict(compute_dtype=jnp.int8), "QuantConfig.compute_dtype"),
        (dict(kernel="cuda"), "QuantConfig.kernel"),
    ],
)
def test_quant_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lj.QuantConfig(**kwargs)


def test_all_linear_is_peft_s_special_value():
    cfg = lj.LoraConfig(targets="all-linear")
    assert cfg.targets == "all-linear"
    assert cfg.is_target("layers_0/mlp/down_proj") and cfg.is_target("encoder/dense")
    assert not cfg.is_target("lm_head") and not cfg.is_target("model/lm_head")
    assert not cfg.is_target("layers_0/mlp/down_proj", linear=False)  # an embedding, a conv
    assert lj.LoraConfig().targets == ("q_proj", "v_proj")
