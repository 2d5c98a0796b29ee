"""The lora_jax benchmark suite: ratios measured in one run on one machine.

Run it with ``python -m benchmarks.run`` (``--help`` lists the options; ``--quick`` for a short
run). `benchmarks/gpu.sh` runs the whole suite on a GPU machine. The figures and how they were
made are in docs/benchmarks.md.
"""
