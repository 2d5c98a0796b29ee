"""Names between lora_jax module paths and Hugging Face module names, one small table per
architecture.

lora_jax's reference `Llama` names its modules as Hugging Face's Llama does, without the
``model.`` prefix and with '/' for '.': ``layers_0/self_attn/q_proj`` is Hugging Face's
``model.layers.0.self_attn.q_proj``. A `NameMap` is that table; the Llama family (Llama,
Mistral, Qwen2, Qwen3) shares one. A user with their own Flax model passes their own
`NameMap` to the Hugging Face and PEFT functions.

Parameters map by name (`PARAM_NAMES`: ``kernel`` / ``embedding`` / ``scale`` -> ``weight``,
``bias`` -> ``bias``) and by layout: a linear kernel (in..., out...) is Hugging Face's weight
(out, in) — its input axes and output axes each flattened, then transposed; embeddings,
norms and biases keep their layout.
"""

from __future__ import annotations

import dataclasses
import re

PARAM_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class NameMap:
    """Module paths <-> Hugging Face module names, as (lora_jax pattern, HF pattern) pairs.

    A pattern is a path with placeholders: ``{i}`` matches a number, ``{rest}`` any remaining
    path; in a lora_jax path a placeholder's value is '/'-joined, in a Hugging Face name
    '.'-joined. The first pair whose pattern matches wins.

    Example:
      >>> from lora_jax.io.hf_names import LLAMA
      >>> LLAMA.to_hf("layers_3/self_attn/q_proj")
      'model.layers.3.self_attn.q_proj'
      >>> LLAMA.from_hf("model.layers.3.mlp.down_proj")
      'layers_3/mlp/down_proj'
      >>> LLAMA.to_hf("lm_head")
      'lm_head'
    """

    pairs: tuple[tuple[str, str], ...]

    def to_hf(self, path: str) -> str:
        """The Hugging Face module name of a lora_jax module path."""
        return _convert(path, self.pairs, src=0, sep=("/", "."), what="lora_jax module path")

    def from_hf(self, name: str) -> str:
        """The lora_jax module path of a Hugging Face module name."""
        return _convert(name, self.pairs, src=1, sep=(".", "/"), what="Hugging Face module")

    def param_to_hf(self, path: str) -> str:
        """The Hugging Face tensor name of a lora_jax parameter path (`PARAM_NAMES` for the
        last component).

        Example:
          >>> from lora_jax.io.hf_names import LLAMA
          >>> LLAMA.param_to_hf("layers_0/self_attn/q_norm/scale")
          'model.layers.0.self_attn.q_norm.weight'
        """
        module, _, param = path.rpartition("/")
        if param not in PARAM_NAMES or not module:
            raise ValueError(
                f"The parameter path '{path}' does not end in a module and one of "
                f"{sorted(PARAM_NAMES)}."
            )
        return f"{self.to_hf(module)}.{PARAM_NAMES[param]}"


def _regex(pattern: str, sep: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out += re.escape(pattern[pos : m.start()])
        name = m.group(1)
        out += rf"(?P<{name}>\d+)" if name == "i" else rf"(?P<{name}>.+)"
        pos = m.end()
    return re.compile(out + re.escape(pattern[pos:]))


def _convert(path: str, pairs: tuple, *, src: int, sep: tuple[str, str], what: str) -> str:
    for pair in pairs:
        m = _regex(pair[src], sep[0]).fullmatch(path)
        if m is not None:
            values = {k: v.replace(sep[0], sep[1]) for k, v in m.groupdict().items()}
            return pair[1 - src].format(**values)
    patterns = [p[src] for p in pairs]
    raise ValueError(f"The {what} '{path}' matches none of the name patterns {patterns}.")


LLAMA = NameMap(
    pairs=(
        ("embed_tokens", "model.embed_tokens"),
        ("layers_{i}/{rest}", "model.layers.{i}.{rest}"),
        ("norm", "model.norm"),
        ("lm_head", "lm_head"),
    )
)

# Hugging Face tensors that hold no parameter and that loaders skip, as transformers does
# (older Llama checkpoints store the rotary inverse frequencies, which are recomputed).
LLAMA_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

# Architectures (a config.json's "architectures" entry) whose modules `LLAMA` names.
ARCHITECTURES = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "Qwen3ForCausalLM": LLAMA,
}
