"""Every ``lmrecipes`` command line in the README runs here. Commands on local models run as written (on a tiny
fitted run in an empty folder); fits and evaluations parse with ``--print_config`` (the offline fit itself runs
scaled down in test_cli.py); Hub ones also stop, offline, with the clear "needs the Hub" message."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from lmrecipes import hub
from lmrecipes.cli import EXTRA_COMMANDS, main

sys.path.insert(0, str(Path(__file__).parent))
from test_hub import hub_configs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LIGHTNING = ("fit", "validate", "test", "predict")
# Not lmrecipes command lines: installing, the test suite, benchmarks, SLURM submissions (the script's own
# command line is the torchrun/srun one above it).
OTHER = (
    "python3 -m venv",
    "HF_HUB_OFFLINE=1 pytest",
    "python scripts/",
    "bash scripts/",
    "sbatch ",
    "CONFIG=",
    "pip install",
)


def readme_commands() -> list[str]:
    """Command lines of the README's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def lmrecipes_args(line: str) -> list[str]:
    """The arguments after ``lmrecipes`` (or ``-m lmrecipes``), comments dropped, config paths made absolute."""
    words = shlex.split(line, comments=True)
    start = words.index("lmrecipes") if "lmrecipes" in words else None
    if start is None:
        raise AssertionError(f"not an lmrecipes command: {line}")
    return [str(REPO / w) if w.startswith("configs/") else w for w in words[start + 1 :]]


COMMANDS = [c for c in readme_commands() if not c.startswith(OTHER)]


def test_the_readme_commands_are_all_recognised():
    assert len(COMMANDS) >= 20
    for line in COMMANDS:
        assert lmrecipes_args(line)[0] in (*LIGHTNING, *EXTRA_COMMANDS)
    assert readme_commands()[:2] == [  # the README's first two commands stay as they are
        "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && "
        "lmrecipes fit --config configs/clm/offline.yaml",
        'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[test]" && '
        "HF_HUB_OFFLINE=1 pytest -q",
    ]


@pytest.fixture(scope="module")
def workdir(code_tree, tiny_bert, tmp_path_factory):
    """An empty folder holding what the README's commands read: a (tiny) runs/clm-offline fit and a masked-LM
    export at runs/mlm-offline/export."""
    from test_cli import fit_args

    root = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main(fit_args(code_tree, root))
    shutil.copytree(tiny_bert[0], root / "runs" / "mlm-offline" / "export")
    return root


@pytest.mark.parametrize(
    "line", COMMANDS, ids=[" ".join(lmrecipes_args(c)).replace(f"{REPO}/", "")[:70] for c in COMMANDS]
)
def test_readme_command(line, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    args = lmrecipes_args(line)
    if args[0] in LIGHTNING:
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--print_config"])
        assert exit_.value.code in (0, None)
        config = next(Path(a) for a, before in zip(args[1:], args) if before in ("-c", "--config"))
        if config in hub_configs():
            monkeypatch.setattr(hub, "is_cached", lambda repo_id, kind: False)
            with pytest.raises(ValueError, match="needs the Hugging Face Hub"):
                main(args)
        return
    if args[0] == "tokenizer":  # the book's: a Hub dataset and the Hub's GPT-2
        monkeypatch.setattr(hub, "is_cached", lambda repo_id, kind: False)
        with pytest.raises(
            ValueError, match=r"needs the Hugging Face Hub.*'transformersbook/codeparrot-train'"
        ):
            main(args)
        return
    if args[0] == "evaluate-code":
        run_evaluate_code_line(args, workdir, monkeypatch)
        return
    if args[0] == "export":
        shutil.rmtree(workdir / args[2], ignore_errors=True)
    elif args[0] == "generate" and not (workdir / args[1]).exists():
        main(["export", "runs/clm-offline/checkpoints/last.ckpt", args[1]])
    capsys.readouterr()
    assert main(args) is None
    out = capsys.readouterr().out
    if args[0] == "export":
        assert (workdir / args[2] / "model.safetensors").is_file()
    elif args[0] == "generate":
        prompts = args[args.index("--prompt") + 1]
        count = int(args[args.index("--num_return_sequences") + 1]) if "--num_return_sequences" in args else 4
        assert out.count("-" * 40) == count * (2 if prompts.startswith("[") else 1)
    elif args[0] == "fill-mask":
        assert out.splitlines()[0] == args[2]
    elif args[0] == "plot":
        assert (workdir / args[1] / "curves.png").is_file()


def run_evaluate_code_line(args: list[str], workdir: Path, monkeypatch) -> None:
    """As written, on two problems with two short samples each in one process (164 x 200 samples is a GPU
    job); a Hub model stops offline naming the id; a samples file is scored as written."""
    import json

    from lmrecipes.evaluation.problems import load_problems

    if "--samples" in args:
        problems = list(load_problems().values())[:3]
        lines = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
        Path(args[args.index("--samples") + 1]).write_text("".join(json.dumps(x) + "\n" for x in lines))
        main([*args, "--limit", "3"])
        assert json.loads(Path(args[args.index("--output") + 1]).read_text())["pass@1"] == 1.0
        return
    model = args[1]
    if hub.is_hub_id(model):
        monkeypatch.setattr(hub, "is_cached", lambda repo_id, kind: False)
        hub_needed = "needs the Hugging Face Hub.*" if "/" in model else ""  # 'my-model' is no valid Hub id
        with pytest.raises(
            ValueError, match=f"model='{model}': no such file or folder.*{hub_needed}'{model}'"
        ):
            main(args)
        return
    if not (workdir / model).exists():
        main(["export", "runs/clm-offline/checkpoints/last.ckpt", model])
    small = ["--limit", "2", "--n", "2", "--max_new_tokens", "8", "--devices", "1", "--accelerator", "cpu"]
    main([*args, *small, "--output_dir", "evaluate-code"])
    written = (workdir / "evaluate-code" / "samples.jsonl").read_text().splitlines()
    assert len(written) == 4
    results = workdir / "evaluate-code" / "results.json"
    assert results.is_file() == ("--generate_only" not in args)
    shutil.rmtree(workdir / "evaluate-code")
