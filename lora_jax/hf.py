"""Hugging Face interop: checkpoints in and out, GGUF files, tokenizers, PEFT adapters.

`load_pretrained` reads a Hugging Face directory (Llama, Mistral, Qwen2, Qwen3) or a GGUF file
into `lora_jax.models.Llama`; `save_pretrained` writes one that transformers loads;
`Tokenizer` reads a checkpoint's tokenizer and chat template; `save_peft` / `load_peft` write
and read adapters in PEFT's format (module names through a `NameMap`, `LLAMA` by default). The tokenizer and GGUF reader
need the optional packages of ``pip install "lora_jax[hf]"`` (tokenizers, gguf, jinja2).
See docs/huggingface.md.
"""

from lora_jax.io.gguf import read_gguf
from lora_jax.io.hf_checkpoint import DECODER_LINEAR, load_pretrained, save_pretrained
from lora_jax.io.hf_names import LLAMA, NameMap
from lora_jax.io.peft import load_peft, save_peft
from lora_jax.io.tokenizer import Tokenizer

__all__ = [
    "DECODER_LINEAR",
    "LLAMA",
    "NameMap",
    "Tokenizer",
    "load_peft",
    "load_pretrained",
    "read_gguf",
    "save_peft",
    "save_pretrained",
]
