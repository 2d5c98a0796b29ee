"""The Python snippets of docs/*.md run as written.

Each file's ```python blocks run in order, in one fresh interpreter per file (so that a
snippet's own ``jax.config.update("jax_num_cpu_devices", 8)`` comes before any device is used),
in an empty working directory; the first block of a file defines everything the later ones use.

docs/huggingface.md reads a checkpoint directory and a PEFT adapter that a reader has on disk:
the test writes them where the snippets look ("path/to/SmolLM2-135M-Instruct": a tiny
random-weight Llama with a byte-level BPE tokenizer and a chat template; "their-adapter").

Not run: the multi-host block of docs/scaling_out.md ("Many hosts", fenced ```text): its
``jax.distributed.initialize`` must precede every other JAX call of the process and waits for
the other processes. tests/test_sharding.py::test_two_processes_train_like_one runs the
complete multi-host script (examples/multihost_finetune.py) on two local processes instead.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import lora_jax as lj

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
COVERED = ["checkpoints.md", "huggingface.md", "qlora.md", "scaling_out.md", "variants.md"]
# A fence at any indentation (a snippet inside a list item), closed at the same indentation.
BLOCK = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
# Runs the blocks in one namespace, each compiled at its line of the Markdown file, so that a
# traceback names the doc and the line.
DRIVER = """
import json, sys
namespace = {"__name__": "__main__"}
for where, line, code in json.load(sys.stdin):
    exec(compile("\\n" * line + code, where, "exec"), namespace)
"""
TIMEOUT = 300


def python_blocks(doc: Path) -> list[tuple[int, str]]:
    """(line index of the block's first code line, dedented code) of each ```python block."""
    text = doc.read_text()
    return [
        (text.count("\n", 0, m.start(2)), textwrap.dedent(m.group(2))) for m in BLOCK.finditer(text)
    ]


def run_blocks(doc: Path, cwd: Path) -> None:
    """Runs the doc's blocks in a fresh interpreter in `cwd`."""
    blocks = python_blocks(doc)
    assert blocks, f"{doc.name} has no ```python block"
    payload = json.dumps([(f"docs/{doc.name}", line, code) for line, code in blocks])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    if "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", ""):
        del env["XLA_FLAGS"]  # the snippets set their own device count
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=payload,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"docs/{doc.name} failed:\n{proc.stderr[-4000:]}"


def test_every_doc_with_python_is_covered():
    with_python = sorted(p.name for p in DOCS.glob("*.md") if python_blocks(p))
    assert with_python == COVERED


@pytest.mark.parametrize("doc", COVERED)
def test_doc_snippets_run(doc, tmp_path):
    if doc == "huggingface.md":
        write_tiny_checkpoint(tmp_path)
    run_blocks(DOCS / doc, tmp_path)
    if doc == "huggingface.md":
        assert (tmp_path / "my-merged-model" / "model.safetensors").is_file()
        assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_checkpoint(cwd: Path) -> None:
    """What huggingface.md reads: a Hugging Face directory (tiny random-weight Llama, byte-level
    BPE tokenizer, ChatML template) and a PEFT adapter for that model."""
    tokenizers = pytest.importorskip("tokenizers")
    import lora_jax.hf
    from lora_jax.models import Llama, LlamaConfig

    directory = cwd / "path" / "to" / "SmolLM2-135M-Instruct"
    model = Llama(LlamaConfig.tiny(vocab_size=320))
    x = jnp.zeros((1, 8), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    lora_jax.hf.save_pretrained(directory, model, variables)

    byte_level = tokenizers.pre_tokenizers.ByteLevel
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = byte_level(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,  # within the model's 320
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=byte_level.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["What is the capital of France? Paris is. user assistant"], trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHATML,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))

    cfg = lj.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj"), use_rslora=True)
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(1), x, base_params=variables)
    lora_jax.hf.save_peft(cwd / "their-adapter", params, cfg)
