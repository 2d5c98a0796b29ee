"""The PyTorch peer: Hugging Face PEFT LoRA on `transformers.LlamaForCausalLM`.

Run by `benchmarks/cases/peers.py` and `benchmarks/cases/mfu.py` in a child process (so that
PyTorch's and JAX's GPU memory pools never share one process), with a JSON spec of the
reference model's shapes. The model is built from a `transformers.LlamaConfig` of the same
shapes with random weights, in the same dtype, SDPA attention; PEFT's `LoraConfig` adapts the
same modules with the same rank and alpha; the step is forward, next-token cross-entropy over
float32 logits (as lora_jax's loss), backward and a fused AdamW step over the adapters; it is
timed like the JAX steps (warm-up excluded, device synchronized, median of the runs).

    python -m benchmarks.torch_peft --spec '{"hidden_size": 64, ...}' --json out.json

With ``"use_dora": true`` PEFT's DoRA replaces LoRA. With ``"liger": true`` Liger's Triton
kernels (liger-kernel: RoPE, RMSNorm, SwiGLU) replace transformers' Llama modules first (the
loss stays the same computation as the other rows'). With ``"compile": true`` in the spec the PEFT model runs under `torch.compile` (TorchInductor,
default mode): the warm-up call compiles, a second untimed call absorbs recompilation.

torch, transformers and peft are imported here only; when one is missing, the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _config(spec: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        head_dim=spec["head_dim"],
        rope_theta=spec["rope_theta"],
        rms_norm_eps=spec["rms_norm_eps"],
        tie_word_embeddings=spec["tie_embeddings"],
        max_position_embeddings=spec["max_seq_len"],
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )


def _loss(model, ids, chunk):
    """Next-token cross-entropy over float32 logits; `chunk` tokens at a time if given."""
    import torch
    import torch.nn.functional as F

    inputs, targets = ids[:, :-1], ids[:, 1:]
    if not chunk:
        logits = model(input_ids=inputs).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    # Chunked head + loss, each chunk recomputed in backward (as the JAX side does).
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=inputs).last_hidden_state.reshape(-1, base.config.hidden_size)
    flat = targets.reshape(-1)
    head = base.lm_head
    total = 0.0
    for start in range(0, flat.numel(), chunk):

        def piece(h, t):
            return F.cross_entropy(head(h).float(), t, reduction="sum")

        total = total + torch.utils.checkpoint.checkpoint(
            piece, hidden[start : start + chunk], flat[start : start + chunk], use_reentrant=False
        )
    return total / flat.numel()


def measure(spec: dict) -> dict:
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        return {
            "skipped": f"PyTorch peer not installed (pip install -r requirements-peers.txt "
            f"and torch): {e}"
        }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.get("liger"):  # Liger's fused kernels in transformers' Llama, before it is built
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama(
                rope=True,
                rms_norm=True,
                swiglu=True,
                cross_entropy=False,
                fused_linear_cross_entropy=False,  # the loss is computed as for the others
            )
        except Exception as e:  # not installed, or no Triton / GPU for its kernels
            return {"skipped": f"Liger not usable here: {type(e).__name__}: {str(e)[:200]}"}
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
        spec["dtype"]
    ]
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = transformers.LlamaForCausalLM._from_config(
                _config(spec), dtype=dtype, attn_implementation="sdpa"
            )
        except TypeError:  # transformers 4 spells it torch_dtype
            model = transformers.LlamaForCausalLM._from_config(
                _config(spec), torch_dtype=dtype, attn_implementation="sdpa"
            )
    model.train()
    cfg = peft.LoraConfig(
        r=spec["rank"],
        lora_alpha=2 * spec["rank"],
        lora_dropout=0.0,
        target_modules=list(spec["targets"]),
        bias="none",
        use_dora=bool(spec.get("use_dora")),
    )
    model = peft.get_peft_model(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if spec.get("compile"):  # the peer a PyTorch user picks for speed: PEFT + torch.compile
        model = torch.compile(model)
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=device == "cuda")
    ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["seq"] + 1), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> float:
        sync()
        start = time.perf_counter()
        loss = _loss(model, ids, spec.get("chunked_loss"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compile_start = time.perf_counter()
    step()  # warm-up (with torch.compile: tracing and compiling, forward and backward)
    warmup_s = time.perf_counter() - compile_start
    if spec.get("compile"):
        step()  # a second call: any recompilation happens here, not in the timed runs
    times = [1e3 * step() for _ in range(spec["runs"])]
    ms = statistics.median(times)
    out = {
        "ms": ms,
        "ms_all": [round(t, 4) for t in times],
        "tokens_per_s": spec["batch"] * spec["seq"] / (ms / 1e3),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trainable_params": sum(p.numel() for p in trainable),
        "compiled": bool(spec.get("compile")),
        "liger": bool(spec.get("liger")),
        "warmup_s": warmup_s,
    }
    if device == "cuda":
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--spec", required=True, help="JSON: the model's shapes, batch, seq, rank, targets, runs"
    )
    p.add_argument("--json", required=True, help="where to write the result")
    args = p.parse_args(argv)
    spec = json.loads(args.spec)
    try:
        result = measure(spec)
    except Exception as e:  # reported as a row, e.g. out of memory
        result = {"skipped": f"PEFT failed: {type(e).__name__}: {str(e)[:250]}"}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "ms_all"}))


if __name__ == "__main__":
    main()
