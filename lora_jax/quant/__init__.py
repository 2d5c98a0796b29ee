"""4-bit base weights (QLoRA): formats and the dequantizing matmul."""

from lora_jax.quant.formats import (
    DQ_BLOCK,
    FP4,
    INT4,
    NF4,
    OUTLIER_OCTAVES,
    TABLES,
    QuantizedTensor,
    block_scales,
    dequantize,
    dequantize_matrix,
    dequantize_tree,
    is_quantized,
    quantize,
    quantize_array,
    requantize_like,
    unpack,
)
from lora_jax.quant.matmul import qmatmul

__all__ = [
    "DQ_BLOCK",
    "FP4",
    "INT4",
    "NF4",
    "OUTLIER_OCTAVES",
    "TABLES",
    "QuantizedTensor",
    "block_scales",
    "dequantize",
    "dequantize_matrix",
    "dequantize_tree",
    "is_quantized",
    "qmatmul",
    "quantize",
    "quantize_array",
    "requantize_like",
    "unpack",
]
