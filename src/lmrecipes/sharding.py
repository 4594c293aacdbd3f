"""FSDP2 for every recipe: ``--trainer.strategy fsdp2``.

    lmrecipes fit --config configs/clm/offline.yaml --trainer.strategy fsdp2 --trainer.devices 2
    # options: the strategy's class path with init_args (ZeRO-2, activation checkpointing)
    lmrecipes fit ... --trainer.strategy lmrecipes.sharding.FSDP2Strategy \\
        --trainer.strategy.reshard_after_forward false --trainer.strategy.activation_checkpointing true

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` with every process in one data-parallel group (its
own default puts a node's GPUs in a tensor-parallel group) and sharded checkpoints that are written atomically
(``checkpoints_sharded.py``). The recipes' ``configure_model`` calls :func:`configure_sharding`, which applies
``fully_shard`` to each transformer block, then to the whole Hugging Face model (torchtitan's order: a block's
parameters are gathered just before it runs and freed after).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

STRATEGY_NAME = "fsdp2"

# Hugging Face model_type -> the class of its repeated transformer block (the unit FSDP2 gathers and frees).
BLOCK_CLASSES = {
    "gpt2": "GPT2Block",
    "bert": "BertLayer",
    "distilbert": "TransformerBlock",
    "roberta": "RobertaLayer",
    "gpt_neo": "GPTNeoBlock",
    "llama": "LlamaDecoderLayer",
}
BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over every process; sharded checkpoints with a completion marker."""

    def __init__(
        self,
        *,
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        process_group_backend: str | None = None,
    ) -> None:
        """
        Args:
            reshard_after_forward: free each block's gathered parameters after its forward and gather them again
                for backward (ZeRO-3, least memory); False keeps them until backward (ZeRO-2, less communication).
            activation_checkpointing: recompute each block's activations in backward instead of keeping them.
            process_group_backend: ``nccl`` / ``gloo``; None: Lightning's choice for the device.
        """
        super().__init__(process_group_backend=process_group_backend)
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        # One data-parallel dimension over all processes (ModelParallelStrategy's "auto" is tensor parallel
        # within a node, which the recipes' models are not written for).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        from lmrecipes.checkpoints_sharded import save_atomically

        save_atomically(self, checkpoint, Path(self.broadcast(str(filepath))), storage_options)

    def write_shards(self, checkpoint: dict, path: Path, storage_options) -> None:
        """Lightning's sharded save (one ``.distcp`` per rank, ``.metadata``, ``meta.pt``) into ``path``."""
        super().save_checkpoint(checkpoint, path, storage_options)


def register_strategies() -> None:
    """Make ``--trainer.strategy fsdp2`` a name Lightning knows (called by the CLI before the Trainer is built)."""
    if STRATEGY_NAME not in StrategyRegistry:
        StrategyRegistry.register(
            STRATEGY_NAME,
            FSDP2Strategy,
            description="FSDP2 (fully_shard per transformer block), sharded atomic checkpoints (lmrecipes)",
        )


def check_strategy(value) -> None:
    """A strategy given by name must be one Lightning (or this project) knows: named with the accepted ones."""
    if not isinstance(value, str):
        return
    register_strategies()
    known = StrategyRegistry.available_strategies()
    if value not in known and value != "auto":
        shown = ", ".join(n for n in ["auto", *known] if "xla" not in n and "deepspeed" not in n)
        raise ValueError(
            f"--trainer.strategy {value!r} is not a known strategy; accepted: {shown} (or a Strategy class path)"
        )


def block_class_name(model: torch.nn.Module) -> str:
    """The transformer block class of ``model`` (a Hugging Face model); ValueError for a model not in the table."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BLOCK_CLASSES:
        known = ", ".join(f"{k} ({v})" for k, v in BLOCK_CLASSES.items())
        raise ValueError(
            f"FSDP2 does not know the transformer block of {type(model).__name__} (model_type {model_type!r}); "
            f"known: {known}. Add its block class to lmrecipes.sharding.BLOCK_CLASSES"
        )
    return BLOCK_CLASSES[model_type]


def unsharded_class(model: torch.nn.Module) -> type:
    """The class ``model`` had before ``fully_shard``, which swaps in a subclass (``FSDPGPT2LMHeadModel``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def mixed_precision(precision: str):
    """bf16 parameters in compute with fp32 gradient reduction when the run asks for bf16; else None (fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if str(precision) in BF16_PRECISIONS:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard(model: torch.nn.Module, *, mesh, reshard_after_forward: bool, checkpointing: bool, precision: str):
    """``fully_shard`` each transformer block of ``model``, then ``model`` itself (in place)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return  # configure_model runs again for validate/test after fit
    name = block_class_name(model)
    blocks = [m for m in model.modules() if type(m).__name__ == name]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no {name} modules to shard")
    if checkpointing:
        # Hugging Face's own per-block checkpointing keeps the weights' names (checkpoint_wrapper renames them)
        model.activation_checkpointing_enable({"use_reentrant": False})
    options = {"mesh": mesh, "mp_policy": mixed_precision(precision)}
    options = {k: v for k, v in options.items() if v is not None}
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **options)


def configure_sharding(module) -> None:
    """The recipes' ``configure_model``: shard ``module.model`` when the run uses :class:`FSDP2Strategy`."""
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer (a module built for export or a test)
        return
    strategy = trainer.strategy
    if not isinstance(strategy, FSDP2Strategy):
        return
    shard(
        module.model,
        mesh=strategy.device_mesh["data_parallel"],
        reshard_after_forward=strategy.reshard_after_forward,
        checkpointing=strategy.activation_checkpointing,
        precision=trainer.precision,
    )


def unsharded_module(module, device: str | torch.device | None = None):
    """``module`` with whole weights, for what runs on rank 0 alone (the end-of-fit report, its export): under
    FSDP2 every rank must call this (it gathers the shards) and rank 0 gets a plain copy of the module built from
    its hyper-parameters on ``device`` (default: the training device), the others None; under any other strategy,
    ``module`` itself."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    trainer = module.trainer
    if not isinstance(trainer.strategy, FSDP2Strategy):
        return module
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(module, options=options)  # a collective: rank 0 receives the whole model
    if not trainer.is_global_zero:
        return None
    # as load_from_checkpoint rebuilds a module (LightningCLI adds its own "_class_path" entry)
    copy = type(module)(**{k: v for k, v in module.hparams.items() if not k.startswith("_")})
    copy.load_state_dict(weights)
    return copy.to(device or trainer.strategy.root_device).train(module.training)
