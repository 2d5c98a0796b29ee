"""Files: configs as JSON, orbax train-state checkpoints, lora_jax adapter files."""

from lora_jax.io.adapter_files import load_adapter, save_adapter
from lora_jax.io.checkpoints import Checkpoint, CheckpointManager
from lora_jax.io.config_json import config_from_dict, config_to_dict

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "config_from_dict",
    "config_to_dict",
    "load_adapter",
    "save_adapter",
]
