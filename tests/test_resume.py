"""The Lightning internals that exact resume and preemption rely on. Each test fails when the installed Lightning
renames or changes the meaning of one of them, before the end-to-end resume tests fail in a less obvious way."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from lmrecipes.resume import ExactResume, mark_saved, restart_finished_epoch


def test_modelcheckpoint_skips_saving_again_the_step_marked_saved():
    callback = ModelCheckpoint()
    assert callback._last_global_step_saved == 0  # the attribute mark_saved writes

    def trainer(step: int):
        state = SimpleNamespace(fn=TrainerFn.FITTING)
        return SimpleNamespace(fast_dev_run=False, state=state, sanity_checking=False, global_step=step)

    assert not callback._should_skip_saving_checkpoint(trainer(4))
    mark_saved(callback, 4)
    assert callback._should_skip_saving_checkpoint(trainer(4))
    assert not callback._should_skip_saving_checkpoint(trainer(5))


def test_the_epoch_loops_batch_count_is_what_ends_an_epoch_and_can_be_reset():
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    # Lightning's own end-of-epoch test on restart, the one restart_finished_epoch answers for it.
    source = inspect.getsource(type(trainer.fit_loop.epoch_loop).reset)
    assert "self.batch_progress.current.completed >= self.trainer.num_training_batches" in source
    current.completed = current.ready = 10
    restart_finished_epoch(SimpleNamespace(fit_loop=trainer.fit_loop, num_training_batches=10))
    assert (current.ready, current.completed) == (0, 0)
    current.completed = 3
    restart_finished_epoch(SimpleNamespace(fit_loop=trainer.fit_loop, num_training_batches=10))
    assert current.completed == 3  # mid-epoch: left alone


def test_lightning_registers_its_signal_handlers_after_restoring_and_before_running():
    """Preemption wraps the trainer's ``_signal_connector.register_signal_handlers`` so that its own handlers go
    in right after Lightning's, with no window in which Lightning's SIGTERM handler is in force."""
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert callable(trainer._signal_connector.register_signal_handlers)
    run = inspect.getsource(pl.Trainer._run)
    restore = run.index("_restore_modules_and_callbacks")
    register = run.index("self._signal_connector.register_signal_handlers()")
    assert restore < register < run.index("self._run_stage()")


def test_exact_resume_keeps_the_metadata_export_reads(tmp_path):
    """ExactResume's RNG states and the module's export metadata share ``checkpoint["lmrecipes"]``, written in
    Lightning's order (callbacks first, then the module): neither replaces the other."""
    from lmrecipes.export import record_class

    checkpoint: dict = {}
    trainer = SimpleNamespace(callback_metrics={}, loggers=[])
    ExactResume().on_save_checkpoint(trainer, None, checkpoint)
    from transformers import GPT2Config, GPT2LMHeadModel

    module = pl.LightningModule()
    module.model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    record_class(module, checkpoint, trainer)
    assert {"rng", "seed", "class_path", "metrics", "run_dir", "model_config"} <= set(checkpoint["lmrecipes"])
    connector = pl.Trainer(logger=False, enable_checkpointing=False)._checkpoint_connector
    dump = inspect.getsource(type(connector).dump_checkpoint)
    assert dump.index("_call_callbacks_on_save_checkpoint") < dump.index('"on_save_checkpoint"')
