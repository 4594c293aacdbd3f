"""Loading causal-LM checkpoints: a padded vocabulary is trimmed, a sharded folder is recognised, a checkpoint
written before ``vocab_multiple`` existed still loads, and the step's gradient scale keeps each dtype exact."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from transformers import AutoTokenizer

from lmrecipes.models.clm import CausalLM

TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32}


def trained_checkpoint(tmp_path: Path, tiny_lm: Path, **kwargs) -> tuple[CausalLM, Path]:
    """A checkpoint a real Trainer wrote after one step of a tiny model using tiny_lm's tokenizer."""
    vocab = len(AutoTokenizer.from_pretrained(tiny_lm))
    torch.manual_seed(0)
    module = CausalLM(config=TINY, vocab_size=vocab, bos_token_id=0, eos_token_id=0, seq_len=32,
                      tokenizer_path=str(tiny_lm), optimizer={"lr": 1e-2, "warmup_steps": 0}, **kwargs)  # fmt: skip
    batches = [{"input_ids": torch.randint(0, vocab, (2, 16))}]
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    return module, path


def as_sharded_folder(path: Path, folder: Path, keys: tuple = ("state_dict",)) -> Path:
    """The same checkpoint in the sharded layout (one rank's DCP file, meta.pt, the completion marker)."""
    from torch.distributed.checkpoint import save

    from lmrecipes.checkpoints_sharded import META, write_marker

    checkpoint = torch.load(path, weights_only=True)
    save({"state_dict": checkpoint.pop("state_dict")}, checkpoint_id=folder, no_dist=True)
    checkpoint.pop("optimizer_states", None)
    torch.save(checkpoint, folder / META)
    write_marker(folder, world_size=1, step=checkpoint["global_step"], keys=list(keys))
    return folder


def test_a_padded_vocabulary_is_trimmed_when_loading_a_checkpoint_file_or_folder(tiny_lm, tmp_path):
    from lmrecipes.evaluation.command import load_causal_lm
    from lmrecipes.portable import hf_from_checkpoint

    module, path = trained_checkpoint(tmp_path, tiny_lm, vocab_multiple=64)
    vocab = module.hparams.vocab_size
    assert module.model.get_input_embeddings().num_embeddings > vocab  # padded while training
    model, tokenizer, _ = hf_from_checkpoint(path)
    assert model.get_input_embeddings().num_embeddings == vocab == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == vocab  # generation cannot sample a padded id
    trained = module.model.get_input_embeddings().weight[:vocab]
    assert torch.equal(model.get_input_embeddings().weight, trained)
    folder = as_sharded_folder(path, tmp_path / "sharded.ckpt")
    lm, tokenizer = load_causal_lm(str(folder))  # a folder, yet a checkpoint: not handed to from_pretrained
    assert lm.get_input_embeddings().num_embeddings == vocab == len(tokenizer)
    assert torch.equal(lm.get_input_embeddings().weight, trained)


def test_a_checkpoint_written_before_vocab_multiple_existed_still_loads(tiny_lm, tmp_path):
    module, path = trained_checkpoint(tmp_path, tiny_lm, vocab_multiple=1)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["hyper_parameters"]["vocab_multiple"]  # as an older lmrecipes wrote it
    torch.save(checkpoint, path)
    loaded = CausalLM.load_from_checkpoint(path)  # built with today's default padding, then unpadded
    assert loaded.hparams.vocab_multiple == 1
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    ids = torch.randint(0, module.hparams.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), module.eval()(ids))


def test_the_step_scale_is_exact_for_gradients_of_two_dtypes():
    module = CausalLM(config=TINY, vocab_size=50, bos_token_id=0, eos_token_id=0, seq_len=32,
                      optimizer={"lr": 1e-2, "warmup_steps": 0})  # fmt: skip
    module.model.get_input_embeddings().to(torch.bfloat16)  # the first parameter: bf16, the others fp32
    params = list(module.parameters())
    assert params[0].dtype == torch.bfloat16 and params[-1].dtype == torch.float32
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    module._grad_unit, module._step_norm = 1.0, torch.tensor(7.0)  # scale 1/7: not exact in bf16
    module.on_before_optimizer_step(None)
    scale = torch.tensor(1.0) / 7.0  # fp32
    for p in params:
        expected = (torch.full_like(p, 3.0, dtype=torch.float32) * scale).to(p.dtype)
        assert torch.equal(p.grad, expected), (p.dtype, p.grad.flatten()[0], expected.flatten()[0])
