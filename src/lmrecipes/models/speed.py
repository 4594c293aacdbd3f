"""The GPU speed path's pieces that are not a Lightning flag: attention kernels, TF32, a vocabulary padded for
the tensor cores (and trimmed back for export), and ``torch.compile`` with its fall-back."""

from __future__ import annotations

import copy
import math
import warnings

import torch

# transformers' names: "sdpa" is torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU,
# transformers 5's default, made explicit here so a config shows it); "eager" is the reference matmul + softmax.
ATTENTION = ("sdpa", "eager")


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to ``multiple`` (50,257 -> 50,304 for 64, as nanoGPT and llm.c pad GPT-2's):
    the lm_head's matmul then tiles evenly on tensor cores."""
    if multiple < 1:
        raise ValueError(f"model.vocab_multiple={multiple} must be at least 1 (1: no padding)")
    return math.ceil(vocab_size / multiple) * multiple


def trimmed_vocab(model, vocab_size: int):
    """A copy of ``model`` whose embedding (and the lm_head tied to it) keeps only the tokenizer's ``vocab_size``
    rows: the padded rows are never predicted, and a ``pipeline`` must not be able to sample them."""
    if model.get_input_embeddings().num_embeddings == vocab_size:
        return model
    model = copy.deepcopy(model)
    model.resize_token_embeddings(vocab_size)
    return model


def export_vocab_size(hparams: dict) -> int | None:
    """The tokenizer's vocabulary size when the module padded its embedding beyond it (built from config with
    ``vocab_multiple`` > 1), else None: a pretrained model's embedding is exported as it was loaded."""
    if hparams.get("pretrained") or hparams.get("vocab_multiple", 1) <= 1 or "vocab_size" not in hparams:
        return None
    return int(hparams["vocab_size"])


def allow_tf32(device: torch.device) -> bool:
    """Let fp32 matmuls use TF32 tensor cores on CUDA (10-bit mantissa inputs, fp32 accumulation: what an fp32
    run wants on Ampere and later). Called when a fit starts, never at import; a CPU run is left as it is."""
    if device.type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    return True


def compile_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "this platform cannot compile" (dynamo or a backend such as inductor failed), not a
    bug of the model or a CUDA out-of-memory: only these turn compile off."""
    from torch._dynamo import exc
    from torch._inductor import exc as inductor_exc

    # torch 2.13's names; looked up by name so a release that renames one still falls back on the others
    found = [getattr(exc, n, None) for n in ("BackendCompilerFailed", "InternalTorchDynamoError")]
    found += [
        getattr(inductor_exc, n, None) for n in ("InductorError", "InvalidCxxCompiler", "CppCompileError")
    ]
    return tuple(err for err in found if err is not None)


def compiled_or_eager(module: torch.nn.Module, *args, **kwargs):
    """Run ``module`` (compiled with ``module.compile()``); if compiling fails on this platform (no C++ compiler,
    no Triton, an unsupported Python), warn, drop the compiled call and return ``(False, eager result)``, so the
    caller warns only once; on success ``(True, result)``. Any other error (a bug, an out-of-memory) propagates.

    The chosen policy for ``compile`` is to fall back, not to stop: compiling is an optimisation, and a run started
    on a machine without a toolchain still trains the same model, only slower; the warning names the error."""
    try:
        return True, module(*args, **kwargs)
    except compile_errors() as err:
        warnings.warn(
            f"model.compile=true: torch.compile failed on this platform ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:300] if str(err) else ''}); training continues without compile",
            stacklevel=2,
        )
        module._compiled_call_impl = None  # nn.Module.compile's slot: the module calls eagerly again
        return False, module(*args, **kwargs)
