"""Training FLOPs per token from a model's shape, and the dense 16-bit peak FLOP/s of known GPUs: what MFU needs.

MFU = (tokens/s x training FLOPs per token) / the device's peak. The FLOPs follow PaLM (Chowdhery et al. 2022,
appendix B), as nanoGPT and llm.c do: ``6 N + 12 L H Q T`` per token, where

- ``N`` counts the parameters that do matmul work once each: GPT-2's tied ``wte``/``lm_head`` once (the lm_head
  matmul is real work), the position table not at all (a lookup, not a matmul);
- ``12 L H Q T``: the attention scores ``Q K^T`` and ``scores x V`` (2 matmuls x 2 FLOPs x T x H Q per token and
  layer, forward; x 3 with the backward pass), counting the whole T x T score matrix once, although the causal
  mask makes half of it unnecessary (the convention everyone quotes MFU in), and not again for recomputation
  under activation checkpointing (that would be HFU, not MFU);
- ``T`` is the length of the batch being trained, read from each batch, never an assumed context length.

The peak is the dense (not 2:4 sparse) bf16/fp16 tensor-core figure: MFU of any run, also an fp32 one, is quoted
against it, as PaLM, nanoGPT and llm.c do. Lightning 2.6.6's own table misses the H200 (torch names it
"NVIDIA H200") and lists some devices' sparse figures, hence this one.
"""

from __future__ import annotations

import re

import torch

# (pattern on torch.cuda.get_device_name().lower(), dense bf16/fp16 FLOP/s), most specific first: "gh200"
# contains "h200", "h100 nvl" contains "h100". Figures from NVIDIA's datasheets (the "Tensor Core" rows, the
# un-asterisked dense value, half the "with sparsity" one); V100 and T4 have fp16 tensor cores only.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    (r"\bb200\b", 2250e12),  # HGX B200 datasheet: 36 PF bf16 with sparsity per 8 GPUs
    (r"\bgh200\b", 989e12),  # GH200 datasheet: 1,979 TF bf16 with sparsity
    (r"\bh200 nvl\b", 835e12),  # H200 datasheet, NVL column: 1,671 TF bf16 with sparsity
    (r"\bh200\b", 989e12),  # H200 datasheet, SXM column: 1,979 TF bf16 with sparsity
    (r"\bh100 nvl\b", 835e12),  # H100 datasheet, NVL column (per GPU): 1,671 TF with sparsity
    (r"\bh100\b.*\bpcie\b", 756e12),  # H100 datasheet, PCIe column: 1,513 TF with sparsity
    (r"\bh100\b", 989e12),  # "NVIDIA H100 80GB HBM3" is the SXM part: 1,979 TF with sparsity
    (r"\ba100\b", 312e12),  # A100 datasheet (SXM and PCIe alike): 312 TF dense, 624 with sparsity
    (r"\bl40s\b", 362e12),  # L40S datasheet: 733 TF with sparsity
    (r"\bl4\b", 121e12),  # L4 datasheet: 242 TF with sparsity
    (r"\ba10g?\b", 125e12),  # A10 datasheet: 250 TF with sparsity; AWS's A10G publishes no figure of its own
    (r"\brtx a6000\b", 154.8e12),  # RTX A6000 datasheet: 309.7 TF with sparsity
    (r"\brtx 4090\b", 165.2e12),  # Ada whitepaper: 165.2 TF fp16/bf16 with fp32 accumulation, dense
    (r"\bv100\b.*\bpcie\b", 112e12),  # V100 datasheet, PCIe: 112 TF fp16
    (r"\bv100\b", 125e12),  # V100 datasheet, SXM2: 125 TF fp16
    (r"\bt4\b", 65e12),  # T4 datasheet: 65 TF fp16
)


def peak_flops(device_name: str) -> float | None:
    """Dense 16-bit peak FLOP/s of a GPU named as ``torch.cuda.get_device_name()`` names it; None if unknown."""
    name = device_name.lower()
    return next((peak for pattern, peak in PEAK_FLOPS if re.search(pattern, name)), None)


def device_peak_flops(device: torch.device) -> tuple[str, float | None]:
    """(the device's name, its peak) for a CUDA device; ("cpu", None) otherwise: a CPU has no such figure."""
    if device.type != "cuda":
        return device.type, None
    name = torch.cuda.get_device_name(device)
    return name, peak_flops(name)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that do matmul work per token: each tensor once (tied weights), less position tables."""
    positions = {id(m.weight) for n, m in model.named_modules() if n.endswith(("wpe", "position_embeddings"))}
    return sum(p.numel() for p in model.parameters() if id(p) not in positions)


def transformer_flops_per_token(model: torch.nn.Module, seq_len: int, params: int | None = None) -> float:
    """Training FLOPs per token of a batch ``seq_len`` tokens long: ``6 N + 12 L H Q T`` (see the module's doc).
    ``params``: :func:`matmul_params` of the model, when the caller has it already."""
    cfg = model.config
    params = matmul_params(model) if params is None else params
    return 6.0 * params + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
