"""Training throughput and loss-curve agreement: lmrecipes' Lightning ``CausalLM`` vs the Hugging Face ``Trainer``.

Both sides train the same GPT-2 (same initial weights) on the same packed windows of standard-library Python source
(tokenized by a BPE tokenizer trained here), in the same order, with the same AdamW, warmup + cosine schedule,
gradient clipping and accumulation. Prints JSON lines on stdout, progress on stderr.

    HF_HUB_OFFLINE=1 python scripts/bench_train.py                       # tiny GPT-2 on CPU: ~2 min on 2 idle cores
    HF_HUB_OFFLINE=1 python scripts/bench_train.py --device cuda --precision bf16-mixed --gpt2-124m   # + MFU
    HF_HUB_OFFLINE=1 python scripts/bench_train.py --compile     # both sides torch.compile'd

Timing: each side stamps the wall clock when an optimizer step has finished (Lightning: ``on_train_batch_end``
once ``global_step`` moved; Trainer: ``on_step_end``), synchronising CUDA at the two stamps used. Throughput is
the tokens of steps ``skip+1 .. skip+steps`` over the time between the end of step ``skip`` and the end of the
last step, so start-up, the first (warm-up) steps and tear-down are excluded on both sides alike, and everything
each loop does per step (data loading, forward, backward, clipping, optimizer, schedule, logging) is included.
Runs alternate L, H, R, L, H, R, ...; the summary compares the best run of each side (and the medians). R is a
bare PyTorch loop over the same model, loss, clipping, AdamW and schedule: the floor no training loop goes below,
so it shows how much per-step overhead either loop has left.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from lmrecipes.bpe import train_bpe_tokenizer
from lmrecipes.data.packing import iter_windows
from lmrecipes.flops import device_peak_flops, transformer_flops_per_token
from lmrecipes.losses import causal_lm_loss_sum
from lmrecipes.models.clm import CausalLM
from lmrecipes.optim import OptimizerConfig, build_optimizer, split_decay_params

TINY = {"n_layer": 2, "n_embd": 128, "n_head": 4}
HPARAMS = {"lr": 5e-4, "weight_decay": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "lr_schedule": "cosine"}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


class Windows(Dataset):
    """Fixed (N, T) token windows served as ``{"input_ids", "labels"}`` (labels = inputs: the model shifts)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids  # (N, T)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def code_windows(n_seqs: int, seq_len: int, tok_vocab: int) -> tuple[torch.Tensor, int]:
    """``n_seqs`` EOS-packed windows of stdlib source, shape (N, T), and the EOS id; deterministic."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    texts, chars = [], 0
    for path in files:  # ~3 chars per token for a small code BPE: read 2x what the windows need
        if chars > 6 * n_seqs * seq_len:
            break
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        chars += len(texts[-1])
    tokenizer = train_bpe_tokenizer(texts, vocab_size=tok_vocab, progress=False)
    docs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    packed = iter_windows(enumerate(docs), seq_len=seq_len, eos_id=tokenizer.eos_token_id, mode="concat")
    windows = np.stack([window for window, _ in packed])  # (n, T)
    if len(windows) < n_seqs:
        raise ValueError(f"only {len(windows)} windows of {seq_len} tokens, need {n_seqs}")
    return torch.from_numpy(windows[:n_seqs]).long(), tokenizer.eos_token_id


class Clock:
    """Wall-clock stamps at the end of optimizer steps ``skip`` and ``total``."""

    def __init__(self, skip: int, total: int, cuda: bool):
        self.skip, self.total, self.cuda = skip, total, cuda
        self.stamps: dict[int, float] = {}

    def step_done(self, step: int) -> None:
        if step in (self.skip, self.total):
            if self.cuda:
                torch.cuda.synchronize()
            self.stamps[step] = time.perf_counter()

    def seconds(self) -> float:
        return self.stamps[self.total] - self.stamps[self.skip]


class LightningProbe(pl.Callback):
    """Clock stamps; optionally the per-step loss (mean over the accumulated micro-batches) and the LR used."""

    def __init__(self, clock: Clock | None, record: bool):
        self.clock, self.record = clock, record
        self.micro, self.losses, self.lrs, self.step = [], [], [], 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.record:
            self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.record:  # Lightning hands back training_step's loss divided by accumulate_grad_batches
            self.micro.append(outputs["loss"].detach())
        if trainer.global_step == self.step:
            return
        self.step = trainer.global_step
        if self.record:
            self.losses.append(torch.stack(self.micro).sum().item())  # mean over the window
            self.micro = []
        if self.clock:
            self.clock.step_done(self.step)


class TrainerProbe(TrainerCallback):
    """The same for the HF Trainer; its losses are read from ``state.log_history``."""

    def __init__(self, clock: Clock | None, record: bool):
        self.clock, self.record, self.lrs = clock, record, []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.record:
            self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock:
            self.clock.step_done(state.global_step)


def training_args(
    out_dir: str, args, hp: dict, steps: int, accumulate: int, log_every: int
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out_dir,
        learning_rate=hp["lr"],
        weight_decay=hp["weight_decay"],
        adam_beta1=hp["betas"][0],
        adam_beta2=hp["betas"][1],
        adam_epsilon=hp["eps"],
        lr_scheduler_type=hp["lr_schedule"],
        warmup_steps=hp["warmup_steps"],
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=accumulate,
        max_grad_norm=1.0,
        bf16=args.precision == "bf16-mixed",
        logging_steps=log_every,
        report_to="none",
        save_strategy="no",
        use_cpu=args.device == "cpu",
        dataloader_pin_memory=args.device == "cuda",
        torch_compile=args.compile,
        train_sampling_strategy="sequential",  # the same order as Lightning's shuffle=False loader
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
    )


def build_trainer(model, data, args, hp: dict, steps: int, accumulate: int, probe: TrainerProbe) -> Trainer:
    # GPT2LMHeadModel's name holds no LOSS_MAPPING key, so loss_type is None and the Trainer (transformers 5.23)
    # counts num_items_in_batch over all T labels instead of the T-1 shifted ones: loss and gradient x (T-1)/T.
    model.loss_type = "ForCausalLM"
    out_dir = tempfile.mkdtemp()  # nothing is saved (save_strategy="no"); keeps the repo clean
    targs = training_args(out_dir, args, hp, steps, accumulate, 1 if probe.record else steps)
    trainer = Trainer(model=model, args=targs, train_dataset=Windows(data), callbacks=[probe])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    return trainer


def fit_trainer(model, data, args, hp: dict, steps: int, accumulate: int, probe: TrainerProbe) -> list[float]:
    trainer = build_trainer(model, data, args, hp, steps, accumulate, probe)
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def fit_lightning(module, data, args, steps: int, accumulate: int, probe: LightningProbe) -> None:
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        accumulate_grad_batches=accumulate,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[probe],
    )
    loader = DataLoader(Windows(data), batch_size=args.batch, shuffle=False, pin_memory=args.device == "cuda")
    with contextlib.redirect_stdout(sys.stderr):
        trainer.fit(module, loader)


def fit_raw(module: CausalLM, data, args, steps: int, accumulate: int, clock: Clock) -> None:
    """The floor of what any loop can cost: a bare PyTorch loop over the same model, loss, clipping, AdamW and
    schedule (no hooks, no logging, no position bookkeeping): how much per-step overhead there is to cut at all."""
    device = torch.device(args.device)
    model = module.model.to(device).train()
    optimizer, schedule = build_optimizer(model, module.optimizer_config, total_steps=steps)
    batches = iter(
        DataLoader(Windows(data), batch_size=args.batch, shuffle=False, pin_memory=args.device == "cuda")
    )
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    for step in range(1, steps + 1):
        for _ in range(accumulate):
            ids = next(batches)["input_ids"].to(device, non_blocking=True)  # (B, T)
            with autocast:
                total, count = causal_lm_loss_sum(model(input_ids=ids, use_cache=False).logits, ids)
            (total / count / accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_done(step)


def make_template(args, eos_id: int, hp: dict, dropout: float | None) -> CausalLM:
    """The seeded initial model both sides start from (deep-copied per run)."""
    config = {} if args.gpt2_124m else dict(TINY)
    if dropout is not None:
        config |= {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    torch.manual_seed(args.seed)
    ids = {"vocab_size": args.vocab, "bos_token_id": eos_id, "eos_token_id": eos_id, "seq_len": args.seq_len}
    # vocab_multiple=1: both sides train the very same model (the Trainer's loss would see padded rows)
    return CausalLM(
        config=config,
        loss="ce",
        **ids,
        optimizer=OptimizerConfig(**hp),
        compile=args.compile,
        vocab_multiple=1,
    )


def setup_check(template: CausalLM, args, hp: dict) -> dict:
    """Do both sides decay the same parameters (the Trainer's own create_optimizer); GPT-2's loss_type."""
    model, dummy = copy.deepcopy(template.model), torch.zeros(1, 2, dtype=torch.long)
    trainer = build_trainer(model, dummy, args, hp, 1, 1, TrainerProbe(None, False))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = trainer.create_optimizer().param_groups
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    theirs = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    ours = set(split_decay_params(template.model)[0])
    record = {"bench": "setup", "gpt2_loss_type": template.model.loss_type}
    record["trainer_optim"] = trainer.args.optim  # ours: fused AdamW on CUDA, foreach on CPU
    record |= {"decay_groups_match": ours == theirs, "only_lightning_decays": sorted(ours - theirs)}
    return record | {"only_trainer_decays": sorted(theirs - ours)}


def peak_flops(device: str) -> float | None:
    return device_peak_flops(torch.device(device))[1]  # the project's dense bf16 table, as TokenThroughput


def timed_run(impl: str, template: CausalLM, data, args, hp: dict) -> float:
    """Tokens/s of one fit of ``skip + steps`` optimizer steps, over the last ``steps``."""
    total = args.skip + args.steps
    clock = Clock(args.skip, total, args.device == "cuda")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if impl == "raw":
        fit_raw(copy.deepcopy(template), data, args, total, args.accumulate, clock)
    elif impl == "lightning":
        fit_lightning(
            copy.deepcopy(template), data, args, total, args.accumulate, LightningProbe(clock, False)
        )
    else:
        model = copy.deepcopy(template.model)
        fit_trainer(model, data, args, hp, total, args.accumulate, TrainerProbe(clock, False))
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return args.steps * args.batch * args.accumulate * args.seq_len / clock.seconds(), peak


def throughput(args, data, eos_id: int, hp: dict) -> None:
    """Alternating timed runs (L, H, L, H, ...), one line each, then the summary."""
    template = make_template(args, eos_id, hp, dropout=None)
    flops, peak = transformer_flops_per_token(template.model, args.seq_len), peak_flops(args.device)
    meta = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "accumulate": args.accumulate}
    meta |= {"params": sum(p.numel() for p in template.model.parameters()), "precision": args.precision}
    rates = {"lightning": [], "hf_trainer": [], "raw": []}
    for run in range(args.repeats):
        for impl, runs in rates.items():
            rate, peak_mem = timed_run(impl, template, data, args, hp)
            runs.append(rate)
            mfu = round(rate * flops / peak, 4) if peak else None
            emit(
                {
                    "bench": "train",
                    "impl": impl,
                    "run": run,
                    "tokens_per_s": round(rate, 1),
                    **meta,
                    "mfu": mfu,
                    "peak_mem_gib": None if peak_mem is None else round(peak_mem, 2),
                    "compile": args.compile,
                }
            )
    best = {k: round(max(v), 1) for k, v in rates.items()}
    median = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    ratio = best["lightning"] / best["hf_trainer"]
    summary = {
        "bench": "train_summary",
        "lightning_vs_trainer": round(ratio, 3),
        "target_ge_1.0": ratio >= 1.0,
    }
    summary["median_ratio"] = round(median["lightning"] / median["hf_trainer"], 3)
    summary["median_lightning_vs_bare_loop"] = round(median["lightning"] / median["raw"], 3)
    summary |= {"best_tokens_per_s": best, "median_tokens_per_s": median, "flops_per_token": flops}
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    summary |= {"peak_flops": peak, "device": device, "threads": torch.get_num_threads()}
    emit(summary | {"compile": args.compile, "load_avg_1min": round(os.getloadavg()[0], 2)})


def agreement(args, data, eos_id: int, hp: dict, accumulate: int) -> None:
    """Per-step losses and LRs of both loops from the same weights, dropout off, over ``agree_steps`` steps."""
    template, steps = make_template(args, eos_id, hp, dropout=0.0), args.agree_steps
    ours, theirs = LightningProbe(None, True), TrainerProbe(None, True)
    fit_lightning(copy.deepcopy(template), data, args, steps, accumulate, ours)
    hf_losses = fit_trainer(copy.deepcopy(template.model), data, args, hp, steps, accumulate, theirs)
    diffs = [abs(a - b) for a, b in zip(ours.losses, hf_losses, strict=True)]
    lr_diffs = [abs(a - b) / max(b, 1e-12) for a, b in zip(ours.lrs, theirs.lrs, strict=True)]
    record = {"bench": "loss_agreement", "accumulate": accumulate, "steps": steps, "max_abs_diff": max(diffs)}
    record["first_step_over_1e-4"] = next((i + 1 for i, d in enumerate(diffs) if d > 1e-4), None)
    record |= {"max_lr_rel_diff": max(lr_diffs), "weight_decay": hp["weight_decay"]}
    record["first_losses_lightning"] = [round(x, 6) for x in ours.losses[:5]]
    record["first_losses_trainer"] = [round(x, 6) for x in hf_losses[:5]]
    emit(
        record
        | {"last_loss_lightning": round(ours.losses[-1], 6), "last_loss_trainer": round(hf_losses[-1], 6)}
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    p.add_argument("--gpt2-124m", action="store_true", help="GPT-2 small, vocab 50257, context 1024")
    p.add_argument("--batch", type=int, default=8, help="micro-batch size")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (1024 with --gpt2-124m)")
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation for the throughput runs")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--skip", type=int, default=3, help="untimed first optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    p.add_argument("--agree-steps", type=int, default=20, help="steps compared for loss agreement")
    p.add_argument("--warmup-steps", type=int, default=5, help="LR warmup (both sides)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    p.add_argument("--no-agree", action="store_true", help="skip the loss-agreement runs (bench_gpu.sh)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one run: checks that the script works (tests/test_benchmarks.py); measures nothing",
    )
    args = p.parse_args()
    if args.smoke:
        args.batch, args.seq_len, args.steps, args.skip, args.repeats = 2, 32, 2, 1, 1
        args.agree_steps, args.warmup_steps = 2, 1
    args.seq_len = args.seq_len or (1024 if args.gpt2_124m else 128)
    args.vocab = 50257 if args.gpt2_124m else 2048
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # both sides: TF32 for any fp32 matmul
    hp = {**HPARAMS, "warmup_steps": args.warmup_steps}
    needed = max((args.skip + args.steps) * args.accumulate, args.agree_steps * 2) * args.batch
    t0 = time.perf_counter()
    data, eos_id = code_windows(needed, args.seq_len, min(args.vocab, 8192))  # (N, T)
    print(
        f"data: {tuple(data.shape)} windows of stdlib code in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    check = setup_check(make_template(args, eos_id, hp, dropout=0.0), args, hp)
    emit(check)
    agree_hp = hp if check["decay_groups_match"] else {**hp, "weight_decay": 0.0}
    for accumulate in () if args.no_agree else (1, 2):
        agreement(args, data, eos_id, agree_hp, accumulate)
    throughput(args, data, eos_id, hp)
    print(f"done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
