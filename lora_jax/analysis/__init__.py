"""What an adapter learned (Hu et al. 2021, "LoRA", §7): the singular spectrum of ΔW and its
effective rank, whether two adapters share directions (subspace similarity), and how strongly
ΔW amplifies directions of the weight it adapts.

Functions on matrices (`delta_svd`, `stable_rank`, `subspace_similarity`, `amplification`,
...) work with leading batch axes and under `jax.jit`; `adapter_report` and `compare_adapters`
run them over lora_jax trees. The report command, ``python -m lora_jax.analysis ADAPTER
[OTHER] --base MODEL``, prints the tables and writes plots (`lora_jax.analysis.report`).
See docs/analysis.md.
"""

from lora_jax.analysis.compare import SIDES, compare_adapters, directions
from lora_jax.analysis.spectrum import (
    AdapterReport,
    Amplification,
    DeltaSVD,
    a_subspace,
    adapter_report,
    adapters,
    amplification,
    as_matrices,
    delta_spectrum,
    delta_svd,
    energy_rank,
    entropy_rank,
    stable_rank,
    subspace_similarity,
)

__all__ = [
    "SIDES",
    "AdapterReport",
    "Amplification",
    "DeltaSVD",
    "a_subspace",
    "adapter_report",
    "adapters",
    "amplification",
    "as_matrices",
    "compare_adapters",
    "delta_spectrum",
    "delta_svd",
    "directions",
    "energy_rank",
    "entropy_rank",
    "stable_rank",
    "subspace_similarity",
]
