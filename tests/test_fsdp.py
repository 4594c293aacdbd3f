"""FSDP2 (``--trainer.strategy fsdp2``) through the real CLI with 2 gloo processes on CPU: the same losses as DDP,
sharded checkpoints written atomically (an unfinished one is skipped by ``--ckpt_path last``, a missing rank's file
is named), exact resume after SIGTERM, and the export of a sharded checkpoint into a folder ``pipeline`` loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from faults import read_log
from test_cli import OFFLINE, fit_args
from test_resilience import (
    CKPTS,
    assert_same_batches_and_losses,
    callbacks_config,
    chain_args,
    run_cli,
    signal_at,
)

from lmrecipes.checkpoints import resolve_ckpt_path
from lmrecipes.checkpoints_sharded import MARKER
from lmrecipes.cli import main
from lmrecipes.sharding import block_class_name, check_strategy, mixed_precision

TWO_CPUS = ["--trainer.devices", "2", "--trainer.accelerator", "cpu"]
FSDP2 = ["--trainer.strategy", "fsdp2", *TWO_CPUS]
DDP = ["--trainer.strategy", "ddp", *TWO_CPUS]
# the options through the class path: gathered weights kept until backward (ZeRO-2), each block recomputed
ZERO2 = ["--trainer.strategy", "lmrecipes.sharding.FSDP2Strategy", "--trainer.strategy.reshard_after_forward", "false",
         "--trainer.strategy.activation_checkpointing", "true", *TWO_CPUS]  # fmt: skip
# The end-of-fit report evaluates and exports on rank 0 alone: under FSDP2 the shards are gathered for it first.
REPORT = {
    "class_path": "lmrecipes.callbacks.RecipeReport",
    "init_args": {"prompts": ["import pandas"], "max_batches": 2},
}


@pytest.fixture(scope="module")
def ddp_and_fsdp2_runs(code_tree, tmp_path_factory) -> dict[str, Path]:
    """The same 10 steps (gradient clipping on) under DDP and under FSDP2, each logging every rank's losses."""
    root = tmp_path_factory.mktemp("fsdp")
    tok = root / "tok"
    runs = {}
    for name, launch in (("ddp", DDP), ("fsdp2", FSDP2), ("zero2", ZERO2)):
        run = root / name
        run.mkdir()
        config = callbacks_config(run / "cb.yaml", run / "log", REPORT, every=5)
        args = fit_args(code_tree, run, "--data.init_args.tokenizer", str(tok), "--config", config,
                        "--trainer.max_steps", "10", "--trainer.limit_val_batches", "0", *launch)  # fmt: skip
        proc = run_cli(args, run)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = run
    return runs


@pytest.mark.slow
def test_fsdp2_gives_the_losses_of_ddp_and_writes_complete_sharded_checkpoints(ddp_and_fsdp2_runs):
    ddp = read_log(ddp_and_fsdp2_runs["ddp"] / "log")
    for name in ("fsdp2", "zero2"):
        fsdp2 = read_log(ddp_and_fsdp2_runs[name] / "log")
        assert sorted(fsdp2) == [0, 1]
        for rank in (0, 1):
            assert [r["step"] for r in fsdp2[rank]] == list(range(1, 11))
            assert [r["hash"] for r in fsdp2[rank]] == [r["hash"] for r in ddp[rank]]  # the same batches
            for a, b in zip(ddp[rank], fsdp2[rank]):
                assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), f"{name} rank {rank} step {a['step']}"
    last = ddp_and_fsdp2_runs["fsdp2"] / CKPTS / "last.ckpt"
    assert last.is_dir()
    marker = json.loads((last / MARKER).read_text())
    assert marker["world_size"] == 2 and marker["global_step"] == 10
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= set(marker["files"])
    meta = torch.load(last / "meta.pt", weights_only=True)  # every rank's RNG states, loadable weights-only
    assert len(meta["lmrecipes"]["rng"]) == 2
    assert [r["consumed"] for r in meta["CodeDataModule"]["ranks"]] == [10, 10]  # both ranks' data positions
    assert not list(last.parent.glob(".*"))  # no temporary folder left behind


@pytest.mark.slow
def test_a_sharded_checkpoint_missing_or_cutting_short_a_rank_file_is_named(ddp_and_fsdp2_runs, tmp_path):
    broken = tmp_path / "step5.ckpt"
    shutil.copytree(ddp_and_fsdp2_runs["fsdp2"] / CKPTS / "step5.ckpt", broken)
    assert resolve_ckpt_path(str(broken), None) == str(broken)
    (broken / "__1_0.distcp").unlink()
    with pytest.raises(ValueError, match=r"missing __1_0\.distcp \(rank 1's shard of 2\)"):
        resolve_ckpt_path(str(broken), None)
    shard = broken / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])  # cut short, as by a disk that filled up after the marker
    with pytest.raises(
        ValueError, match=r"__0_0\.distcp \(rank 0's shard of 2\) has \d+ bytes, the save wrote"
    ):
        resolve_ckpt_path(str(broken), None)


def test_bf16_asks_for_bf16_parameters_and_fp32_gradient_reduction():
    policy = mixed_precision("bf16-mixed")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision("bf16-true").param_dtype == torch.bfloat16
    assert mixed_precision("32-true") is None and mixed_precision("16-mixed") is None


def test_unknown_strategy_and_unknown_block_class_are_named():
    with pytest.raises(ValueError, match=r"'fdsp2' is not a known strategy; accepted: auto, .*fsdp2"):
        main(["fit", "--config", OFFLINE, "--trainer.strategy", "fdsp2"])  # before anything is built
    check_strategy("fsdp2")
    check_strategy("ddp")
    from transformers import OPTConfig, OPTForCausalLM

    tiny = OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2,
                                    vocab_size=50, max_position_embeddings=16, word_embed_proj_dim=16))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"block of OPTForCausalLM \(model_type 'opt'\); known: gpt2 \(GPT2Block\)"
    ):
        block_class_name(tiny)


@pytest.mark.slow
def test_fsdp2_sigterm_resume_is_exact_and_an_unfinished_checkpoint_is_skipped(code_tree, tmp_path):
    """Uninterrupted 8 FSDP2 steps vs: SIGTERM on rank 1 mid step 4 (both ranks finish step 4, save, exit 143);
    last.ckpt's marker removed as by a kill before the save finished; resume skips it (named), restarts from
    step2.ckpt and reproduces every batch and loss of the uninterrupted run."""
    tok, straight, chain = tmp_path / "tok", tmp_path / "straight", tmp_path / "chain"
    for run in (straight, chain):
        run.mkdir()
    done = run_cli(chain_args(code_tree, straight, tok, callbacks_config(straight / "cb.yaml", straight / "log"),
                              *FSDP2), straight)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    log = chain / "log"
    term = callbacks_config(chain / "term.yaml", log, signal_at("SIGTERM", batch=6, rank=1))
    first = run_cli(chain_args(code_tree, chain, tok, term, *FSDP2), chain)
    assert first.returncode == 143, first.stderr[-3000:]
    last = chain / CKPTS / "last.ckpt"
    assert json.loads((last / MARKER).read_text())["global_step"] == 4
    (last / MARKER).unlink()
    resumed = callbacks_config(chain / "resume.yaml", log)
    second = run_cli(chain_args(code_tree, chain, tok, resumed, *FSDP2, "--ckpt_path", "last"), chain)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{last}: incomplete sharded checkpoint (no {MARKER}: its save did not finish)" in second.stderr
    assert f"resuming from {chain / CKPTS / 'step2.ckpt'}" in second.stderr
    assert json.loads((last / MARKER).read_text())["global_step"] == 8
    assert_same_batches_and_losses(read_log(straight / "log"), read_log(log))


@pytest.mark.slow
def test_a_sharded_checkpoint_exports_to_a_folder_pipeline_loads_with_the_weights_ddp_trained(
    ddp_and_fsdp2_runs, tmp_path
):
    from transformers import AutoModelForCausalLM, pipeline

    from lmrecipes.export import export_command

    exported = {}
    for name in ("ddp", "fsdp2"):
        run = ddp_and_fsdp2_runs[name]
        out = export_command(str(run / CKPTS / "last.ckpt"), str(tmp_path / name))
        exported[name] = AutoModelForCausalLM.from_pretrained(out).state_dict()
        report = (
            run / "runs/clm-offline/export"
        )  # written by the end-of-fit report from the live (sharded) model
        exported[f"{name} report"] = AutoModelForCausalLM.from_pretrained(report).state_dict()
    for name in ("fsdp2", "ddp report", "fsdp2 report"):
        assert exported[name].keys() == exported["ddp"].keys()
        for key, weight in exported["ddp"].items():  # 10 steps of FSDP2 training = 10 steps of DDP training
            torch.testing.assert_close(exported[name][key], weight, rtol=0, atol=1e-5, msg=f"{name}: {key}")
    generator = pipeline("text-generation", model=str(tmp_path / "fsdp2"), device="cpu")
    text = generator("import pandas as pd\n", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("import pandas as pd\n") and len(text) > len("import pandas as pd\n")


@pytest.mark.slow
def test_the_streamed_clm_recipe_refuses_to_resume_on_another_world_size(ddp_and_fsdp2_runs, code_tree):
    # Its position is per (rank, worker) shard stream: it cannot be converted to another number of streams.
    run = ddp_and_fsdp2_runs["fsdp2"]
    args = fit_args(code_tree, run, "--data.init_args.tokenizer", str(run.parent / "tok"),
                    "--trainer.max_steps", "12", "--trainer.strategy", "fsdp2", "--trainer.devices", "1",
                    "--trainer.accelerator", "cpu", "--ckpt_path", str(run / CKPTS / "step5.ckpt"))  # fmt: skip
    proc = run_cli(args, run)
    assert proc.returncode != 0
    assert "cannot resume the data position" in proc.stderr and "world_size: 2 -> 1" in proc.stderr
