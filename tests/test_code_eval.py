"""HumanEval generation and the ``evaluate-code`` command on a tiny real GPT-2 with a real BPE tokenizer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmrecipes.cli import main
from lmrecipes.evaluation.generation import (
    STOP_STRINGS,
    Sampling,
    complete,
    cut_at_stop,
    prompt_ids,
    sample_seed,
    sampling_from_preset,
)


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_cut_at_first_stop_string():
    assert cut_at_stop("\n    return x\n\ndef g():\n    pass", STOP_STRINGS) == ("\n    return x\n", True)
    assert cut_at_stop("\n    x = 1\n    # c\nprint(x)", STOP_STRINGS) == ("\n    x = 1\n    # c", True)
    assert cut_at_stop("\n    return 1", STOP_STRINGS) == ("\n    return 1", False)
    # the earliest stop string wins, whichever comes first in the list
    assert cut_at_stop("a\nif b\nclass C", STOP_STRINGS) == ("a", True)


def test_seeds_depend_only_on_problem_and_sample():
    assert sample_seed(0, "HumanEval/0", 3) == sample_seed(0, "HumanEval/0", 3)
    seeds = {sample_seed(s, t, i) for s in (0, 1) for t in ("HumanEval/0", "HumanEval/1") for i in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)


def test_presets_and_overrides():
    assert sampling_from_preset("pass@1") == Sampling(n=200, temperature=0.2, top_p=0.95)
    assert sampling_from_preset("pass@100", n=20).temperature == 0.8
    assert sampling_from_preset("pass@100", n=20).n == 20
    assert sampling_from_preset("greedy").greedy and sampling_from_preset("greedy").n == 1
    with pytest.raises(ValueError, match="preset='pass@7'; accepted: pass@1, pass@100, greedy"):
        sampling_from_preset("pass@7")
    with pytest.raises(ValueError, match="temperature=0"):
        sampling_from_preset("pass@1", temperature=0)
    with pytest.raises(ValueError, match="n=0"):
        sampling_from_preset("pass@1", n=0)


def test_prompt_is_stripped_prefixed_with_eos_and_cut_from_the_left(tiny_lm):
    _, tokenizer = load(tiny_lm)
    ids, cut = prompt_ids(tokenizer, "def f(x):\n    '''doc'''\n", context=128, max_new_tokens=16)
    assert not cut and ids[0] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:]) == "def f(x):\n    '''doc'''"
    long_prompt = "def f(x):\n" + "    y = x + 1\n" * 100
    ids, cut = prompt_ids(tokenizer, long_prompt, context=128, max_new_tokens=16)
    assert cut and len(ids) == 112 and tokenizer.decode(ids).endswith("y = x + 1")
    with pytest.raises(ValueError, match="max_new_tokens=128 leaves no room"):
        prompt_ids(tokenizer, "x", context=128, max_new_tokens=128)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        prompt_ids(tokenizer, "x", context=128, max_new_tokens=16)


@pytest.mark.parametrize("greedy", [True, False])
def test_samples_do_not_depend_on_the_batch(tiny_lm, greedy):
    model, tokenizer = load(tiny_lm)
    sampling = Sampling(n=8, greedy=greedy, temperature=1.0, top_p=0.95, max_new_tokens=24)
    prompt = 'def add(a, b):\n    """Add two numbers."""\n'
    seeds = [sample_seed(0, "t", i) for i in range(8)]
    state = torch.random.get_rng_state()
    together, _ = complete(model, tokenizer, prompt, seeds, sampling)
    alone = [complete(model, tokenizer, prompt, [s], sampling)[0][0] for s in seeds]
    assert together == alone
    assert torch.equal(state, torch.random.get_rng_state())  # nothing drawn from the global generator
    assert all(text for text in together)
    if greedy:
        assert len(set(together)) == 1
    else:
        assert len(set(together)) > 1  # different seeds, different samples


def test_greedy_matches_transformers_generate(tiny_lm):
    model, tokenizer = load(tiny_lm)
    sampling = Sampling(n=1, greedy=True, max_new_tokens=24)
    prompt = "import os\n\ndef walk(path):\n"
    ids, _ = prompt_ids(tokenizer, prompt, context=128, max_new_tokens=24)
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, pad_token_id=0)[
        0, len(ids) :
    ]
    new = out.tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    expected, _ = cut_at_stop(tokenizer.decode(new), STOP_STRINGS)
    assert complete(model, tokenizer, prompt, [0], sampling)[0] == [expected]


def evaluate(*args: str) -> None:
    main(["evaluate-code", *args])


def gen_args(model: Path, out: Path, *extra: str) -> list[str]:
    """Four problems, four samples each at the pass@100 preset's temperature, a few tokens: seconds on a CPU."""
    return [str(model), "--preset", "pass@100", "--n", "4", "--limit", "4", "--max_new_tokens", "12",
            "--generate_only", "true", "--accelerator", "cpu", "--output_dir", str(out), *extra]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_samples(tiny_lm, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("one") / "eval"
    evaluate(*gen_args(tiny_lm, out, "--batch_size", "4"))
    records = read_jsonl(out / "samples.jsonl")
    assert [(r["task_id"], r["sample"]) for r in records] == [
        (f"HumanEval/{t}", s) for t in range(4) for s in range(4)
    ]
    assert not list(out.glob("samples.rank*"))  # parts merged away
    return records


@pytest.mark.slow
def test_two_processes_and_batch_size_one_write_the_same_samples(tiny_lm, tmp_path, one_process_samples):
    """Lightning Fabric's launcher starts a second process; each generates its share with batch size 1."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "lmrecipes", "evaluate-code", *gen_args(tiny_lm, out, "--batch_size", "1")]
    done = subprocess.run([*cmd, "--devices", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("generated 8/8 batches") == 2  # each process made half of the 16
    assert read_jsonl(out / "samples.jsonl") == one_process_samples
    # other settings in the same folder: rank 0 finds out, and both processes stop (neither waits for ever)
    refused = subprocess.run(
        [*cmd, "--devices", "2", "--seed", "1"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and "other settings" in refused.stderr


@pytest.mark.slow
def test_killed_evaluation_continues_where_it_stopped(tiny_lm, tmp_path, one_process_samples):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmrecipes", "evaluate-code", *gen_args(tiny_lm, out, "--batch_size", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    part = out / "samples.rank0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not part.exists() or part.read_text().count("\n") < 5):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = part.read_text().count("\n")
    assert 5 <= written < 16, written
    with open(part, "a") as f:
        f.write('{"task_id": "HumanEval/3", "compl')  # a line the kill cut short
    evaluate(*gen_args(tiny_lm, out, "--batch_size", "3"))  # another batch size: same samples
    assert read_jsonl(out / "samples.jsonl") == one_process_samples
    with pytest.raises(ValueError, match=r"other settings \(sampling: .*'seed': 0.*'seed': 1"):
        evaluate(*gen_args(tiny_lm, out, "--seed", "1"))


def test_execution_needs_the_flag_and_workers(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="pass --allow_code_execution true"):
        evaluate(str(tiny_lm), "--preset", "greedy", "--output_dir", str(tmp_path / "x"))
    with pytest.raises(ValueError, match="--workers 0"):
        evaluate(str(tiny_lm), "--allow_code_execution", "true", "--workers", "0")
    assert not (tmp_path / "x").exists()  # refused before anything was written
    with pytest.raises(
        ValueError, match="'no-such-model' is neither a local path nor a Hub id with a namespace"
    ):
        evaluate("no-such-model", "--allow_code_execution", "true", "--output_dir", str(tmp_path / "y"))


def test_tiny_model_evaluated_end_to_end(tiny_lm, tmp_path, capsys):
    out = tmp_path / "e2e"
    evaluate(str(tiny_lm), "--preset", "greedy", "--limit", "3", "--max_new_tokens", "16",
             "--allow_code_execution", "true", "--output_dir", str(out))  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["pass@1"] == 0.0  # random weights: nothing passes; the point is the path
    assert results["sampling"]["greedy"] and results["sampling"]["max_new_tokens"] == 16
    assert results["model"] == str(tiny_lm) and "sandbox" in results
    assert len(results["samples"]) == 3
    assert "pass@1 = 0.00 %" in capsys.readouterr().out


def test_execute_only_scores_a_samples_file(tmp_path, capsys):
    from lmrecipes.evaluation.problems import load_problems

    problems = list(load_problems().values())[:6]
    lines = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    lines += [{"task_id": p["task_id"], "completion": "    return None\n"} for p in problems]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "results.json"
    evaluate("--samples", str(samples), "--execute_only", "true", "--allow_code_execution", "true",
             "--output", str(out), "--limit", "6")  # fmt: skip
    results = json.loads(out.read_text())
    assert results["pass@1"] == pytest.approx(0.5)  # each problem: one right, one wrong sample
    assert "pass@10" not in results  # n = 2 < 10
    assert "pass@1 = 50.00 %" in capsys.readouterr().out


def callback_config(path: Path, problems: Path, *, humaneval: bool = True) -> str:
    """Checkpoints every 3 steps and, with ``humaneval``, greedy pass@1 on 3 problems every 3 steps."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": "runs/clm-offline/checkpoints", "filename": "step{step}",
                      "auto_insert_metric_name": False, "every_n_train_steps": 3, "save_top_k": -1,
                      "save_last": True},
    }  # fmt: skip
    callbacks = [checkpoint]
    if humaneval:
        args = {"every_n_steps": 3, "num_problems": 3, "max_new_tokens": 12, "problems": str(problems)}
        callbacks.append({"class_path": "lmrecipes.evaluation.callback.HumanEvalCallback", "init_args": args})
    path.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))
    return str(path)


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory) -> Path:
    from lmrecipes.evaluation.problems import load_problems

    # Two problems whose completion lands inside a raw string literal that the test closes: any completion
    # passes the first and fails the second, so pass@1 over the three is 1/3 whatever the tiny model writes.
    # (''', not the docstrings' """ that a model trained on code is quick to write.)
    inside_string = {"prompt": "def f():\n    return 1\n\nNOTE = r'''", "entry_point": "f"}
    always = {**inside_string, "task_id": "any/0", "test": "'''\n\ndef check(f):\n    assert f() == 1\n"}
    never = {**inside_string, "task_id": "any/1", "test": "'''\n\ndef check(f):\n    assert f() == 2\n"}
    path = tmp_path_factory.mktemp("problems") / "three.jsonl"
    rows = [
        never,
        always,
        load_problems()["HumanEval/0"],
    ]  # under 2 processes the one that passes is rank 1's
    path.write_text("".join(json.dumps(p) + "\n" for p in rows))
    return path


def fit_run(code_tree: Path, run: Path, config: str, *extra: str) -> Path:
    from test_cli import fit_args

    run.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run)
        main(fit_args(code_tree, run, "--config", config, *extra))
    return run


def metric_rows(run: Path, key: str) -> list[tuple[int, float]]:
    from test_cli import read_metric

    return read_metric(run, key)


@pytest.fixture(scope="module")
def fitted_with_humaneval(code_tree, problems_file, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("he")
    return fit_run(code_tree, root / "run", callback_config(root / "cb.yaml", problems_file))


@pytest.mark.slow
def test_callback_logs_pass_at_1_without_changing_training(
    code_tree, problems_file, fitted_with_humaneval, tmp_path
):
    rows = metric_rows(fitted_with_humaneval, "val/humaneval_pass@1")
    assert rows == [(3, pytest.approx(1 / 3)), (6, pytest.approx(1 / 3))]
    ckpt = torch.load(fitted_with_humaneval / "runs/clm-offline/checkpoints/last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("HumanEvalCallback")]
    assert state == {"history": [[3, pytest.approx(1 / 3)], [6, pytest.approx(1 / 3)]], "last_step": 6}
    plain = fit_run(
        code_tree, tmp_path / "plain", callback_config(tmp_path / "cb.yaml", problems_file, humaneval=False)
    )
    # greedy generation draws nothing from the generators dropout uses: the losses are the same
    assert metric_rows(plain, "train/loss") == metric_rows(fitted_with_humaneval, "train/loss")
    assert metric_rows(plain, "val/humaneval_pass@1") == []


@pytest.mark.slow
def test_callback_resumes_without_repeating_an_evaluation(
    code_tree, problems_file, fitted_with_humaneval, tmp_path
):
    config = callback_config(tmp_path / "cb.yaml", problems_file)
    run = fit_run(code_tree, tmp_path / "run", config, "--trainer.max_steps", "3")
    third = pytest.approx(1 / 3)
    assert metric_rows(run, "val/humaneval_pass@1") == [(3, third)]
    fit_run(code_tree, run, config, "--ckpt_path", "last")
    assert metric_rows(run, "val/humaneval_pass@1") == [(3, third), (6, third)]  # step 3 not evaluated again
    ckpt = torch.load(run / "runs/clm-offline/checkpoints/last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("HumanEvalCallback")]
    assert state["history"] == [[3, third], [6, third]]


@pytest.mark.slow
def test_a_checkpoint_copied_elsewhere_is_evaluated(
    fitted_with_humaneval, problems_file, tmp_path, monkeypatch
):
    copy = tmp_path / "elsewhere" / "model.ckpt"
    copy.parent.mkdir()
    copy.write_bytes((fitted_with_humaneval / "runs/clm-offline/checkpoints/last.ckpt").read_bytes())
    monkeypatch.chdir(copy.parent)
    evaluate(str(copy), "--preset", "greedy", "--problems", str(problems_file), "--max_new_tokens", "8",
             "--allow_code_execution", "true", "--output_dir", "eval")  # fmt: skip
    results = json.loads((copy.parent / "eval" / "results.json").read_text())
    assert results["pass@1"] == pytest.approx(1 / 3) and len(results["samples"]) == 3


@pytest.mark.slow
def test_callback_shares_the_problems_between_two_processes(code_tree, problems_file, tmp_path):
    from test_cli import fit_args
    from test_resilience import run_cli

    config = callback_config(tmp_path / "cb.yaml", problems_file)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    proc = run_cli(fit_args(code_tree, tmp_path, "--config", config, *ddp), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 completes problems 0 and 2 (both fail), rank 1 problem 1 (passes): 1/3 only if the counts are summed
    third = pytest.approx(1 / 3)
    assert metric_rows(tmp_path, "val/humaneval_pass@1") == [(3, third), (6, third)]
