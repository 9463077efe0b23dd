"""FP8 grouped GEMM for the MoE experts (`fp8_grouped_mm`, torch._scaled_grouped_mm
with rowwise scales) and its pure-torch reference (`fp8_grouped_mm_reference`,
the same quantization with every GEMM emulated in float32)."""
from .grouped import BACKEND, BACKEND_WGRAD, FP8GroupedMM, fp8_grouped_mm, fp8_grouped_unavailable
from .quant_paths import QUANT, quant_path, torchao_import_error
from .quant import FP8, FP8_MAX, column_major, fp8_scale, quantize_fp8
from .reference import emulated_scaled_grouped_mm, fp8_grouped_mm_reference, grouped_wgrad_reference
from .wgrad import fp8_grouped_wgrad

__all__ = ["BACKEND", "BACKEND_WGRAD", "QUANT", "quant_path", "torchao_import_error", "FP8", "FP8_MAX", "FP8GroupedMM", "column_major", "emulated_scaled_grouped_mm",
           "fp8_grouped_mm", "fp8_grouped_mm_reference", "fp8_grouped_unavailable", "fp8_scale",
           "fp8_grouped_wgrad", "grouped_wgrad_reference", "quantize_fp8"]
