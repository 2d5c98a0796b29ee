"""Tests for `lora_jax.io.config_json`: configs to and from JSON.

Every field of a `LoraConfig` (and its `QuantConfig`) round trips exactly through JSON, types
included; an unknown field is named.
"""

import dataclasses
import json

import jax.numpy as jnp
import pytest

import lora_jax as lj
from lora_jax import config as config_module
from lora_jax.io import config_from_dict, config_to_dict

QuantConfig = getattr(config_module, "QuantConfig", None)


CONFIGS = [
    lj.LoraConfig(),
    lj.LoraConfig(
        rank=3,
        alpha=7,
        dropout=0.25,
        targets=r".*/(q|v)_proj",
        exclude=("layers_0/self_attn/q_proj",),
        rank_pattern={"v_proj": 5, "layers_1/.*": 2},
        alpha_pattern={"q_proj": 1.5},
        use_rslora=True,
        init="gaussian",
        param_dtype=jnp.bfloat16,
        trainable=("lm_head/kernel", ".*norm/scale"),
    ),
]
if QuantConfig is not None:
    CONFIGS.append(
        lj.LoraConfig(
            quantize=QuantConfig(fmt="int4", block_size=32, compute_dtype=jnp.float16, targets="x")
        )
    )


@pytest.mark.parametrize("cfg", CONFIGS)
def test_config_round_trips_exactly_through_json(cfg):
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert data["param_dtype"] == jnp.dtype(cfg.param_dtype).name
    back = config_from_dict(data)
    assert back == cfg
    for f in dataclasses.fields(cfg):
        assert type(getattr(back, f.name)) is type(getattr(cfg, f.name)), f.name


def test_config_from_dict_names_unknown_field():
    with pytest.raises(ValueError, match="LoraConfig has no field 'ranks'"):
        config_from_dict({"ranks": 4})
