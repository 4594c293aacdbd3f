"""The sandbox's runner: the child that ``sandbox.py`` starts for each program; never imported.

Started as ``python -I -S -c BOOTSTRAP <runner size> <settings>`` with, on stdin, this file compiled once by
the caller (see ``sandbox._compiled_runner``), a random marker line and the program. It starts the namespace's
init (pid 1), which builds the program's filesystem and forks the program; it kills the init when time is up.

Every start pays for what this file imports, so it imports only what it uses, and the cheapest form of it:
``_ctypes`` and ``_signal`` rather than ``ctypes`` and ``signal`` (2.5 ms and 3 ms), nothing from lmrecipes
(the package's imports would cost ~30 ms per program, five times the interpreter's start).
"""

import _ctypes
import _signal as signal
import os
import resource
import sys
import time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 1 << 14, 1 << 18


class Long(_ctypes._SimpleCData):
    _type_ = "l"


class CLibrary:  # the least of ctypes.CDLL(None, use_errno=True): C functions returning a long
    _handle = _ctypes.dlopen(None, 0)

    def __getattr__(self, name):
        class Function(_ctypes.CFuncPtr):
            _flags_, _restype_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO, Long

        return Function((name, self))


libc = CLibrary()


def check(result, what):
    if result != 0:
        err = _ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None):
    names = [None if s is None else os.fsencode(s) for s in (source, target, fstype)]
    check(libc.mount(*names, Long(flags), data and data.encode()), f"mount {target}")


def write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)


def exit_code(status):
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def build_filesystem(owner, size, hide, keep):
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # no mount made here may propagate to the caller's namespace
    held = [(path, os.open(path, os.O_PATH)) for path in keep]  # reachable once their parents are hidden
    attr = (1).to_bytes(8, sys.byteorder) + bytes(24)  # struct mount_attr {.attr_set = MOUNT_ATTR_RDONLY}
    if libc.syscall(Long(442), Long(-100), b"/", Long(0x8000), attr, Long(len(attr))):  # recursive
        mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)  # before Linux 5.12: the root mount only
    for folder in hide:
        mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for path, fd in held:
            if path.startswith(folder + "/"):
                os.makedirs(path, exist_ok=True)
                mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)  # read-only like its source
        mount(None, folder, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for _, fd in held:
        os.close(fd)
    private = f"size={size},mode=0700,uid={owner[0]},gid={owner[1]}"  # the program's own, and its cwd
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, private)
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:  # a user namespace under a masked /proc (containers) may not: the caller's /proc stays
        pass


def drop_capabilities():
    for cap in range(64):  # the bounding set first, so that no exec gets any back
        if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP; EINVAL past the last capability
            break
    header = (0x20080522).to_bytes(4, sys.byteorder) + bytes(4)  # version 3, this process
    check(libc.capset(header, bytes(24)), "capset")  # no effective, permitted or inheritable capability


def run(mode, uid, gid, limits, workdir, path, marker, source):
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
    for which, value in limits:
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY or os.geteuid() == 0 else min(value, hard)
        resource.setrlimit(which, (value, value + (which == resource.RLIMIT_CPU)))  # SIGXCPU, then SIGKILL
    os.chdir(workdir)
    if uid >= 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    elif mode == "user-namespace":
        drop_capabilities()
    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS: setuid binaries stay powerless
    sys.path[:] = path.split("\n") if path else sys.path
    file = os.path.join(workdir, "program.py")
    sys.argv = [file]
    module = type(sys)("__main__")
    module.__file__ = file
    sys.modules["__main__"] = module
    try:
        exec(compile(source, file, "exec"), vars(module))
    except SystemExit as stop:
        os.write(2, f"SystemExit({stop.code!r}) before the program's end\n".encode())
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, marker)
    os._exit(0)


def supervise(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            os._exit(exit_code(status))
        left = deadline - time.monotonic()
        if left <= 0 or signal.sigtimedwait([signal.SIGCHLD], left) is None:
            os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid cannot have been reused
            os.waitpid(pid, 0)  # an init is reaped once its namespace is empty
            os.kill(os.getpid(), signal.SIGALRM)  # the caller reads death by SIGALRM as "timed out"
            os._exit(124)


def main():
    mode, uid, gid, timeout, memory, size, files, nproc, workdir, hide, keep, path = sys.argv[2:]
    uid, gid, memory, size, files, nproc = map(int, (uid, gid, memory, size, files, nproc))
    limits = [
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_CPU, int(float(timeout)) + 1),
        (resource.RLIMIT_FSIZE, size),
        (resource.RLIMIT_NOFILE, files),
        (resource.RLIMIT_CORE, 0),
    ]
    limits += [(resource.RLIMIT_NPROC, nproc)] if nproc else []
    marker, _, source = sys.stdin.buffer.read().partition(b"\n")
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # kept pending until supervise() waits for it
    if mode in ("namespaces", "user-namespace"):
        real_uid, real_gid, user = os.getuid(), os.getgid(), mode == "user-namespace"
        namespaces = 0x20000 | 0x8000000 | 0x40000000 | 0x20000000 | 0x10000000 * user  # mnt ipc net pid user
        check(libc.unshare(namespaces), "unshare")
        if user:
            write("/proc/self/setgroups", b"deny")
            write("/proc/self/uid_map", f"0 {real_uid} 1".encode())
            write("/proc/self/gid_map", f"0 {real_gid} 1".encode())
        pid = os.fork()
        if pid == 0:  # pid 1 of the new namespace
            owner = (max(uid, 0), max(gid, 0))
            build_filesystem(owner, size, hide.split("\n") if hide else [], keep.split("\n") if keep else [])
            write("/tmp/program.py", source)
            child = os.fork()
            if child == 0:
                run(mode, uid, gid, limits, "/tmp", path, marker, source)
            while True:  # reap orphans too, until the program itself ends; then the kernel kills the rest
                done, status = os.wait()
                if done == child:
                    os._exit(exit_code(status))
    else:
        write(os.path.join(workdir, "program.py"), source)
        pid = os.fork()
        if pid == 0:
            run(mode, uid, gid, limits, workdir, path, marker, source)
    supervise(pid, float(timeout))


if __name__ == "__main__":
    main()
