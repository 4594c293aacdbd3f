"""PushToHub under FSDP2: every rank gathers the shards, rank 0 uploads whole weights (the Hub recorded as in
test_hub, two real gloo ranks of a real Trainer)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_hub import Recorder
from test_sharded_saves import _free_port

from lmrecipes import hub


class KeepingRecorder(Recorder):
    """Also keeps the uploaded weights: the staged folder is removed once its upload is done."""

    def upload_folder(self, **kwargs):
        self.weights = load_file(Path(kwargs["folder_path"]) / "model.safetensors")
        return super().upload_folder(**kwargs)


def _fit_on_rank(rank: int, folder: str, port: int) -> None:
    from lmrecipes.models.clm import CausalLM
    from lmrecipes.sharding import FSDP2Strategy, unsharded_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank), HF_TOKEN="hf_test")  # fmt: skip
    recorder = KeepingRecorder()
    for name in ("create_repo", "create_branch", "upload_folder"):
        setattr(hub, name, getattr(recorder, name))
    import huggingface_hub.constants

    huggingface_hub.constants.is_offline_mode = lambda: False  # the recorder is the Hub
    pl.seed_everything(0)
    model = CausalLM(config={"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16}, vocab_size=32,
                     bos_token_id=0, eos_token_id=0, seq_len=16, vocab_multiple=1,
                     optimizer={"lr": 1e-2, "warmup_steps": 0})  # fmt: skip
    batch = {"input_ids": torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(rank))}
    callback = hub.PushToHub(hub_model_id="me/tiny", every_n_train_steps=2, staging_dir=f"{folder}/staging")
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy=FSDP2Strategy(process_group_backend="gloo"),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], default_root_dir=folder)  # fmt: skip
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch] * 2, batch_size=None))
    whole = unsharded_module(model)  # the trained weights, gathered once more to compare with the upload
    uploads = [kind for kind, _ in recorder.calls if kind == "upload_folder"]
    result = {"uploads": len(uploads)}
    if rank == 0:
        result["uploaded"] = recorder.weights
        result["trained"] = {k.removeprefix("model."): v for k, v in whole.state_dict().items()}
    torch.save(result, Path(folder) / f"rank{rank}.pt")


def test_push_to_hub_under_fsdp2_uploads_the_whole_trained_weights_from_rank_0(tmp_path):
    mp.spawn(_fit_on_rank, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["uploads"] == 1 and ranks[1]["uploads"] == 0  # step 2: pushed once, by rank 0 only
    uploaded, trained = ranks[0]["uploaded"], ranks[0]["trained"]
    assert uploaded["transformer.wte.weight"].shape == (32, 16)  # whole, not one rank's half
    for name, value in uploaded.items():
        assert torch.equal(value, trained[name]), name
