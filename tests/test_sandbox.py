"""The code sandbox with real processes: HumanEval's canonical solutions pass, wrong and hostile completions
fail and leave nothing behind; the pass@k estimator against brute force; bad problems and samples files."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import pwd
import socket
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import pytest

from lmrecipes.evaluation.passk import pass_at_k, pass_at_k_table
from lmrecipes.evaluation.problems import check_program, execute_samples, load_problems, read_samples
from lmrecipes.evaluation.sandbox import SandboxLimits, probe_isolation, run_program, run_programs

# 777 MiB: an address-space limit no other sandbox user picks, so its value in the runner's command line
# (777 << 20) finds every process a hostile program left, whoever else runs programs meanwhile.
HOSTILE = SandboxLimits(timeout=1.0, memory_mb=777, output_bytes=1 << 16)
TRACE = str(777 << 20)


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    return load_problems()


@pytest.fixture(scope="module")
def isolation() -> dict:
    return probe_isolation()


@pytest.fixture
def contained(isolation) -> dict:
    """The isolation, for tests of hostile programs: skipped where there is none (they would escape)."""
    if isolation["mode"] == "none":
        pytest.skip(f"programs are not isolated here: {isolation['unavailable']}")
    return isolation


def processes_with(token: str) -> list[int]:
    """Live processes whose command line holds ``token`` (zombies have none)."""
    found = []
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def run_hostile(problems: dict, completion: str) -> str:
    """Run ``completion`` as HumanEval/0's body: it must fail on time and leave no process. Its output."""
    started = time.monotonic()
    result = run_program(check_program(problems["HumanEval/0"], completion), HOSTILE)
    elapsed = time.monotonic() - started
    assert not result.passed and result.status in ("failed", "timed out"), result
    assert elapsed < HOSTILE.timeout + 1.0, elapsed
    assert processes_with(TRACE) == [] and processes_with("31.4159") == []
    return result.output


def test_canonical_solutions_pass_and_wrong_completions_fail(problems):
    right = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    wrong = [{"task_id": t, "completion": "    return None\n"} for t in problems]
    results = execute_samples(right + wrong, problems, workers=2)
    outcomes = {(s["task_id"], s["completion_id"]): s["passed"] for s in results["samples"]}
    assert pass_at_k_table({t: (1, outcomes[(t, 0)]) for t in problems}, [1]) == {"pass@1": 1.0}
    assert [s for s in results["samples"][: len(right)] if not s["passed"]] == []
    assert not any(s["passed"] for s in results["samples"][len(right) :])
    assert [k for k in results if k.startswith("pass@")] == ["pass@1"]  # n = 2: no pass@10
    assert results["pass@1"] == 0.5 and results["n"] == 2 and results["num_problems"] == 164
    assert results["sandbox"]["isolation"] == probe_isolation() and results["sandbox"]["workers"] == 2
    assert results["samples"][len(right)]["output"].rstrip().endswith("AssertionError")


def test_infinite_loop_is_timed_out(problems):
    started = time.monotonic()
    result = run_program(check_program(problems["HumanEval/0"], "    while True:\n        pass\n"), HOSTILE)
    assert result.status == "timed out" and result.returncode is None
    assert HOSTILE.timeout <= time.monotonic() - started < HOSTILE.timeout + 1.0
    assert processes_with(TRACE) == []


def test_huge_allocation_fails(problems, contained):
    assert "MemoryError" in run_hostile(problems, "    x = bytearray(20 * 2**30)\n    return True\n")


def test_fork_bomb_is_contained(problems, contained):
    if not contained["process_limit"]:
        pytest.skip("no process limit here: a fork bomb would take the machine down before its timeout")
    output = run_hostile(problems, "    import os\n    while True:\n        os.fork()\n")
    assert "Resource temporarily unavailable" in output


LEAVE = {  # how the child leaves its parent's process group before it becomes a long sleep
    "fork": "",
    "setsid": "os.setsid()\n        ",
    "double fork": "os.setsid()\n        if os.fork():\n            os._exit(0)\n        ",
}


@pytest.mark.parametrize("leave", list(LEAVE))
def test_background_children_do_not_outlive_the_program(problems, contained, leave):
    if leave != "fork" and not contained["pid_namespace"]:
        pytest.skip(f"no pid namespace here ({contained['unavailable']}): a setsid() child escapes the kill")
    completion = f"""    import os, time
    read, write = os.pipe()
    if os.fork() == 0:
        {LEAVE[leave]}os.write(write, str(os.getpid()).encode() + b" ")
        os.execv("/bin/sleep", ["sleep", "31.4159"])
    time.sleep(0.2)
    for pid in os.read(read, 100).split():  # the sleeper exists when the program ends
        print(open(f"/proc/{{int(pid)}}/cmdline", "rb").read())
    return None
"""
    assert "31.4159" in run_hostile(problems, completion)


def test_files_outside_the_working_folder_are_untouched(problems, contained, monkeypatch):
    # world-writable when the probe says the filesystem is read-only: the sandbox, not permissions, stops it
    home = Path(tempfile.mkdtemp(dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    try:
        home.chmod(0o777 if contained["read_only_filesystem"] else 0o755)
        (home / "sentinel").write_text("keep me")
        (home / "sentinel").chmod(0o666)
        monkeypatch.setenv("HOME", str(home))
        caller_home = Path(pwd.getpwuid(os.getuid()).pw_dir) / "lmrecipes-sandbox-was-here"
        completion = f"""    import os, shutil
    for attempt in (lambda: os.remove({str(home / "sentinel")!r}),
                    lambda: open({str(home / "sentinel")!r}, "w").write("overwritten"),
                    lambda: open({str(home / "new")!r}, "w").write("x"),
                    lambda: open({str(caller_home)!r}, "w").write("x"),
                    lambda: open(os.path.expanduser("~/x"), "w").write("x"),
                    lambda: shutil.rmtree({str(home)!r})):
        try:
            attempt()
        except OSError as error:
            print(error)
    return None
"""
        output = run_hostile(problems, completion)
        assert sorted(p.name for p in home.iterdir()) == ["sentinel"], output
        assert not contained["read_only_filesystem"] or "Read-only file system" in output, output
        assert (home / "sentinel").read_text() == "keep me" and not caller_home.exists()
    finally:
        for path in sorted(home.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        home.rmdir()


def test_environment_is_not_inherited(problems, contained, monkeypatch):
    monkeypatch.setenv("LMRECIPES_TEST_SECRET", "hunter2-sandbox-secret")
    before = dict(os.environ)
    completion = """    import glob, os
    print(dict(os.environ))
    for path in glob.glob("/proc/*/environ"):
        try:
            print(path, open(path, "rb").read())
        except OSError:
            pass
    return None
"""
    output = run_hostile(problems, completion)
    assert "{" in output and "hunter2" not in output
    assert dict(os.environ) == before


def test_network_is_unreachable(problems, contained):
    if not contained["network_namespace"]:
        pytest.skip(f"no network namespace here: {contained['unavailable']}")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0)
        completion = f"""    import socket
    socket.create_connection(("127.0.0.1", {listener.getsockname()[1]}), timeout=0.5).sendall(b"pwned")
    return True
"""
        assert "Network is unreachable" in run_hostile(problems, completion)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_only_a_program_that_reaches_its_end_passes():
    assert run_program("print('ok')").passed
    for early in ("import sys\nsys.exit(0)\nraise SystemExit(1)", "import os\nos._exit(0)", "exit()"):
        result = run_program(early)
        assert result.status == "failed", (early, result)
    loud = run_program("print('x' * 1_000_000)\nprint('the end')", SandboxLimits(output_bytes=100))
    assert loud.passed and len(loud.output) < 200 and loud.output.endswith("the end\n"), loud.output
    assert "bytes cut" in loud.output


def test_programs_run_in_parallel_in_input_order():
    results = run_programs([f"print({i})" for i in range(6)], workers=2)
    assert [r.output for r in results] == [f"{i}\n" for i in range(6)]
    with pytest.raises(ValueError, match="workers=0"):
        run_programs(["pass"], workers=0)


@pytest.mark.parametrize(
    "field, value", [("timeout", 0), ("timeout", float("nan")), ("memory_mb", 10), ("open_files", 2.5)]
)
def test_limits_name_a_bad_value(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        SandboxLimits(**{field: value})


def test_estimator_equals_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))  # samples 0..c-1 pass
                expected = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    exact = 1 - Fraction(math.comb(190, 100), math.comb(200, 100))
    assert pass_at_k(200, 10, 100) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_table_reports_only_reachable_k():
    counts = {"a": (10, 3), "b": (20, 0)}
    table = pass_at_k_table(counts)
    assert list(table) == ["pass@1", "pass@10"] and table["pass@1"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match=r"pass@100 .* a has n=10"):
        pass_at_k_table(counts, [1, 100])
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k_table(counts, [0])
    with pytest.raises(ValueError, match="c=4 .* n=3"):
        pass_at_k(3, 4, 1)


def write_lines(path: Path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


@pytest.mark.parametrize(
    "bad, message",
    [
        (b'{"task_id": "HumanEval/999", "completion": "x"}', "unknown task_id 'HumanEval/999'"),
        (b'{"task_id": "HumanEval/1"}', "missing field 'completion'"),
        (b'{"task_id": "HumanEval/1", "completion": 3}', "completion must be a string"),
        (b'{"task_id": "HumanEval/1", "completion": "\xff\xfe"}', "not UTF-8"),
        (b'{"task_id": "HumanEval/1", "compl', "invalid JSON"),
    ],
)
def test_bad_samples_lines_are_named(problems, tmp_path, bad, message):
    good = json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"}).encode()
    path = write_lines(tmp_path / "samples.jsonl", [good, b"", bad])
    with pytest.raises(ValueError, match=rf"samples.jsonl:3: {message}"):
        read_samples(path, problems)


def test_problems_from_a_file(problems, tmp_path):
    first = [problems[t] for t in list(problems)[:2]]
    path = tmp_path / "two.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(p) + "\n" for p in first))
    assert list(load_problems(str(path))) == ["HumanEval/0", "HumanEval/1"]
    bad = {k: v for k, v in first[0].items() if k != "test"}
    plain = write_lines(tmp_path / "bad.jsonl", [json.dumps(first[1]).encode(), json.dumps(bad).encode()])
    with pytest.raises(ValueError, match="bad.jsonl:2: the field 'test' is missing"):
        load_problems(plain)
    line = {"task_id": "HumanEval/0", "completion": "", "sample": 0}  # fields beyond the two are ignored
    samples = write_lines(tmp_path / "s.jsonl", [json.dumps(line).encode()])
    assert read_samples(samples, problems) == [{"task_id": "HumanEval/0", "completion": ""}]
