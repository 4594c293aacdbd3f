"""``model.compile``: only a compile failure turns compile off; any other error of the forward propagates."""

import pytest
import torch

from lmrecipes.models.speed import compiled_or_eager


class OutOfMemoryAtForward(torch.nn.Module):
    """A module whose forward fails as a too-large batch would on a GPU: not a reason to stop compiling."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_an_out_of_memory_error_propagates_and_leaves_compile_on():
    torch._dynamo.reset()
    module = OutOfMemoryAtForward()
    module.compile()
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        compiled_or_eager(module, torch.ones(2, 4))
    assert module._compiled_call_impl is not None  # not dropped: the caller decides what to do with an OOM
    assert module.calls == 1  # no eager retry either


def test_a_compiled_module_keeps_its_state_dict_names():
    from test_speed import TINY, clm

    module = clm(compile=True, config=TINY).eval()
    names = set(module.state_dict())
    with torch.no_grad():
        module(torch.randint(0, 50, (2, 8)))
    assert module._compiled is True
    assert set(module.state_dict()) == names and not any("_orig_mod" in n for n in names)


def _fit_fsdp2_compiled(rank: int, port: int, folder: str) -> None:
    import os
    import warnings

    import lightning.pytorch as pl

    from lmrecipes.models.clm import CausalLM
    from lmrecipes.sharding import FSDP2Strategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", NODE_RANK="0",
                      LOCAL_RANK="0", RANK="0")  # fmt: skip
    pl.seed_everything(0)
    model = CausalLM(config={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}, vocab_size=32,
                     bos_token_id=0, eos_token_id=0, seq_len=16, vocab_multiple=1, compile=True,
                     optimizer={"lr": 1e-2, "warmup_steps": 0})  # fmt: skip
    batch = {"input_ids": torch.randint(0, 32, (2, 16))}
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, strategy=FSDP2Strategy(process_group_backend="gloo"),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=folder)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch] * 2, batch_size=None))
    fell_back = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    with open(f"{folder}/outcome.txt", "w") as f:
        f.write(f"compiled={model._compiled} fell_back={fell_back}")


@pytest.mark.slow
def test_fsdp2_with_compile_trains_compiled(tmp_path):
    import torch.multiprocessing as mp
    from test_sharded_saves import _free_port

    mp.spawn(_fit_fsdp2_compiled, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    assert (tmp_path / "outcome.txt").read_text() == "compiled=True fell_back=[]"
