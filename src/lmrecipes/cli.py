"""``lmrecipes``: LightningCLI (fit/validate/test/predict) plus the tokenizer/export/generate commands.

    lmrecipes fit --config configs/clm/offline.yaml
    lmrecipes fit --config configs/clm/offline.yaml --ckpt_path last        # resume
    lmrecipes tokenizer --source python-install --out tok --vocab_size 8192 --max_chars 20000000
    lmrecipes prepare -c configs/clm/offline.yaml --output prepared/ --num_proc 2   # pre-tokenized shards
    lmrecipes export runs/clm-offline/checkpoints/last.ckpt exported/
    lmrecipes generate exported/ --prompt "import pandas as pd"
    lmrecipes fill-mask exported-mlm/ "This is a great [MASK]."
    lmrecipes evaluate-code exported/ --preset greedy --allow_code_execution true   # HumanEval pass@k
    lmrecipes plot runs/clm-offline                                          # curves.png of any run

Add ``--quiet`` anywhere to turn off progress bars (CI logs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lmrecipes.defaults import (
    as_list,
    check_resume_callbacks,
    run_callbacks,
    run_loggers,
    run_plugins,
    run_root,
)

# Values that come from the data reach the model here and nowhere else. A link whose target the chosen model
# class does not take is skipped by jsonargparse, so one table serves every recipe.
DATA_TO_MODEL = {
    "vocab_size": "vocab_size",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "seq_len": "seq_len",
    "tokenizer_path": "tokenizer_path",
    "num_labels": "num_labels",
    "label_names": "label_names",
}


class RecipeCLI(LightningCLI):
    """LightningCLI with the data -> model links and a checkpoint that knows how to resume."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        # The default ModelCheckpoint's arguments: a section, so a variant's `checkpoint: {every_n_train_steps: 80}`
        # merges with its base's (a trainer.callbacks list would replace the base's whole list).
        parser.add_class_arguments(ModelCheckpoint, "checkpoint", instantiate=False)
        parser.set_defaults({"checkpoint.save_last": True})
        for source, target in DATA_TO_MODEL.items():
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        from lmrecipes.data.groups import nulls_as_configs

        super().parse_arguments(parser, nulls_as_configs(args) if isinstance(args, list) else args)
        from lmrecipes.portable import check_ckpt_path

        subcommand = self.config.get("subcommand")
        # Before LightningCLI reads the hyper-parameters out of --ckpt_path (with torch's help text on failure).
        check_ckpt_path((self.config[subcommand] if subcommand else self.config).get("ckpt_path"))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_batch_sizes(config)
        check_hub_values(config)
        from lmrecipes.sharding import check_strategy

        # also registers `fsdp2` before the Trainer looks the name up
        check_strategy(config.get("trainer.strategy"))

    def instantiate_trainer(self, **kwargs):
        """The config's trainer with the run's default callbacks, loggers and checkpoint I/O (``defaults.py``)."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer", {})
        check_launcher_devices(trainer.get("devices", "auto"), str(trainer.get("accelerator", "auto")))
        root = run_root(trainer)
        checkpoint = config.get("checkpoint")
        callbacks = run_callbacks(
            as_list(trainer.get("callbacks")),
            root=root,
            checkpoint=checkpoint.as_dict() if hasattr(checkpoint, "as_dict") else checkpoint,
            counts_data=hasattr(self.datamodule, "data_stats"),
            checkpointing=trainer.get("enable_checkpointing") is not False,
        )
        defaults = {
            "callbacks": callbacks,
            "logger": run_loggers(trainer.get("logger"), root=root),
            "plugins": run_plugins(trainer.get("plugins")),
        }
        return super().instantiate_trainer(**{**defaults, **kwargs})

    def resolve_checkpoint(self) -> None:
        """Run before every subcommand: a corrupt or truncated checkpoint is named before anything trains, and
        "last" falls back to the newest valid one in the ModelCheckpoint folder."""
        from lmrecipes.checkpoints import remove_partial_saves, resolve_ckpt_path
        from lmrecipes.resume import ExactResume

        config = self.config_init[self.subcommand]
        folder = next(
            (cb.dirpath for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)), None
        )
        if folder and self.trainer.is_global_zero and Path(folder).is_dir():
            for tmp in remove_partial_saves(folder):
                print(f"lmrecipes: removed {tmp} (left by a save that was interrupted)", flush=True)
        asked = config.get("ckpt_path")
        if asked == "last":
            check_resume_callbacks(self.trainer.callbacks)
        config["ckpt_path"] = resolve_ckpt_path(
            asked, folder, quarantine=self.trainer.is_global_zero, training=self.subcommand == "fit"
        )
        for callback in self.trainer.callbacks:  # each process resolves on its own: ExactResume compares
            if isinstance(callback, ExactResume):
                callback.resume_from = config["ckpt_path"]
        if asked == "last" and config["ckpt_path"] is None and self.trainer.is_global_zero:
            print(f"lmrecipes: no checkpoint in {folder} yet: starting from scratch", flush=True)

    before_fit = before_validate = before_test = before_predict = resolve_checkpoint


def check_batch_sizes(config) -> None:
    """Every ``*batch_size`` of the data is at least 1, named before anything is built (0 ended in range()'s error)."""
    for key, value in config.items():
        if key.startswith("data.") and key.endswith("batch_size") and type(value) is int and value < 1:
            raise ValueError(f"--{key} {value}: a batch holds at least 1 example per process; pass 1 or more")


def check_hub_values(config) -> None:
    """Hub ids in the model and data arguments are valid, and reachable or cached, before anything is built."""
    from lmrecipes.hub import HUB_KEYS, require_hub

    values = {key: config.get(key) for key in HUB_KEYS}
    if config.get("data.init_args.train_tokenizer.vocab_size"):
        values.pop("data.init_args.tokenizer")  # a folder the run writes, not one it reads
    require_hub(values)


def check_launcher_devices(devices, accelerator) -> None:
    """Under torchrun, ``trainer.devices`` must equal the processes per node: with ``auto`` on CPU Lightning picks one
    device, skips its world-size check, and every process trains alone into the same files."""
    import torch

    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    if local_world is None or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    count = len(devices) if isinstance(devices, (list, tuple)) else str(devices)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if count in ("auto", "-1") and not on_cpu:
        return  # all local GPUs: Lightning checks that against the world size itself
    if str(count) != local_world:
        raise ValueError(
            f"torchrun started {local_world} processes per node but trainer.devices is {devices!r}: "
            f"pass --trainer.devices {local_world} (and --trainer.num_nodes for several nodes)"
        )


def expand_config(path: str, _seen: tuple[str, ...] = ()) -> list[str]:
    """A config file, preceded by the files it ``extends`` (resolved next to it), as ``--config`` values.

    Variants state only what differs: ``extends: codeparrot-ds.yaml`` then the changed keys. Values are merged by
    jsonargparse as if each file were given with its own ``--config``, base first.
    """
    import yaml

    if path in _seen:
        raise ValueError(f"config {path} extends itself through {' -> '.join(_seen)}")
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return [path]  # let jsonargparse report it (it also accepts inline YAML)
    if not isinstance(content, dict) or "extends" not in content:
        return [path]
    base = str(Path(path).parent / content.pop("extends"))
    return [*expand_config(base, (*_seen, path)), yaml.safe_dump(content, sort_keys=False)]


CONFIG_FLAGS = ("--config", "-c")


def config_value(args: list[str], i: int) -> tuple[str | None, int]:
    """The config file named at ``args[i]`` in any form argparse accepts (``-c X``, ``--config X``,
    ``--config=X``, ``-c=X``, ``-cX``) and the index after it; ``(None, i)`` when ``args[i]`` names none."""
    arg = args[i]
    if arg in CONFIG_FLAGS:
        return (args[i + 1], i + 2) if i + 1 < len(args) else (None, i)
    if arg.startswith("--config="):
        return arg.split("=", 1)[1], i + 1
    if arg.startswith("-c") and not arg.startswith("--"):
        return arg[2:].removeprefix("="), i + 1
    return None, i


def expand_configs(args: list[str]) -> list[str]:
    """Every config given on the command line, in any form, replaced by its ``extends`` chain (base first)."""
    out, i = [], 0
    while i < len(args):
        value, after = config_value(args, i)
        if value is None:
            out.append(args[i])
            i += 1
            continue
        for part in expand_config(value):
            out += ["--config", part]
        i = after
    return out


def run_lightning(args: list[str]) -> None:
    import warnings

    # We always pass the (config-expanded) arguments explicitly; Lightning warns when sys.argv holds any too.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    RecipeCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=expand_configs(args),
    )


def prepare_command(args: list[str]) -> None:
    """``lmrecipes prepare -c CONFIG --output DIR --num_proc N [--shard_chars C]``: the config's data section
    (any ``--data...`` override too) built into a prepared folder; train from it with ``data.packing.prepared``."""
    import argparse

    from lmrecipes.data.prepare import check_num_proc, prepare

    parser = argparse.ArgumentParser(prog="lmrecipes prepare", description=prepare_command.__doc__)
    parser.add_argument(
        "--output", required=True, help="the prepared folder (new, or one a killed build left)"
    )
    parser.add_argument("--num_proc", type=int, default=1, help="processes that tokenize shards in parallel")
    parser.add_argument("--shard_chars", type=int, default=None, help="characters of text per shard file")
    opts, rest = parser.parse_known_args(args)
    check_num_proc(opts.num_proc)  # before the config's tokenizer is trained or its corpus listed
    cli = RecipeCLI(model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True,
                    run=False, save_config_callback=None, args=expand_configs(rest))  # fmt: skip
    if not hasattr(cli.datamodule, "prepare_spec"):
        raise ValueError(f"lmrecipes prepare builds causal-LM data; {type(cli.datamodule).__name__} has none")
    folder = prepare(cli.datamodule.prepare_spec(opts.shard_chars), opts.output, num_proc=opts.num_proc)
    print(f"prepared {folder}: train from it with --data.init_args.packing.prepared {folder}")


def run_function(function, args: list[str]) -> None:
    from jsonargparse import auto_cli

    auto_cli(function, args=args)


EXTRA_COMMANDS = ("tokenizer", "export", "generate", "fill-mask", "plot", "evaluate-code")


def extra_commands() -> dict:
    from lmrecipes.bpe import tokenizer_command
    from lmrecipes.curves import plot_command
    from lmrecipes.evaluation.command import evaluate_code_command
    from lmrecipes.export import export_command, fill_mask_command, generate_command

    return {
        "tokenizer": tokenizer_command,
        "export": export_command,
        "generate": generate_command,
        "fill-mask": fill_mask_command,
        "evaluate-code": evaluate_code_command,
        "plot": plot_command,
    }


def optional_model_argument(args: list[str]) -> list[str]:
    """The command's arguments; ``evaluate-code MODEL`` becomes ``--model MODEL``, since a samples file is scored
    without a model and jsonargparse has no optional positional argument."""
    rest = args[1:]
    if args[0] == "evaluate-code" and rest and not rest[0].startswith("-"):
        return ["--model", *rest]
    return rest


def quiet(args: list[str]) -> list[str]:
    """Strip ``--quiet`` and turn progress bars off (Lightning's through an override, tqdm's through its env)."""
    if "--quiet" not in args:
        return args
    os.environ["TQDM_DISABLE"] = "1"
    args = [a for a in args if a != "--quiet"]
    if args and args[0] in ("fit", "validate", "test", "predict", "prepare"):
        args += ["--trainer.enable_progress_bar=false", "--data.init_args.progress=false"]
    elif args and args[0] == "tokenizer":
        args += ["--progress=false"]
    return args


def main(argv: list[str] | None = None) -> None:
    """Console entry point; returns None so a successful fit exits 0 (returning the CLI object exits 1)."""
    args = quiet(list(sys.argv[1:] if argv is None else argv))
    # DataLoader workers fork after the tokenizer ran.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    commands = extra_commands() if args and args[0] in EXTRA_COMMANDS else {}
    if commands:
        run_function(commands[args[0]], optional_model_argument(args))
    else:
        try:
            prepare_command(args[1:]) if args and args[0] == "prepare" else run_lightning(args)
        except ValueError as err:
            # jsonargparse wraps errors raised in our __init__ validation in a long "Union subtypes" report;
            # the user needs only our message, which names the key and the accepted values.
            if (
                "Does not validate against any of the Union subtypes" in str(err)
                and err.__cause__ is not None
            ):
                raise err.__cause__ from None
            raise
