"""The dtype the fused ops accumulate in, shared by the PyTorch reference kernels and Triton's."""

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; fp32, bf16 and fp16 accumulate in fp32."""
    return torch.promote_types(dtype, torch.float32)
