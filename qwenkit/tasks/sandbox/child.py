"""The sandbox's child: the first Python code of every run, started by `qwenkit.tasks.sandbox` as

    python -I -B -X utf8 child.py SETTINGS

(isolated mode: no PYTHON* variables, no user site-packages, not even this file's folder on
sys.path), under `unshare` where the namespaces are available. It sets the namespaces up, applies
the limits, installs the audit hook, then runs the program, `main.py` in the working folder, as
`__main__`. It uses the standard library only, so nothing of qwenkit is loaded where the program
runs. A failure while setting up exits with status SETUP_FAILED and a "sandbox setup failed" line,
before any of the program runs.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import runpy
import sys
from dataclasses import asdict, dataclass

SETUP_FAILED = 125  # the exit status when setting up fails
PID_MAX_NOTE = "pid_max"  # the note left in the report folder when the pid namespace's pid_max was set

# mount(2) flags, from <sys/mount.h>.
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
# The kernel locks a mount's atime flags when it was made outside the user namespace, and a bind
# remount that does not repeat them fails: they are carried over from mountinfo.
ATIME_FLAGS = {
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}

# prctl(2) options, from <linux/prctl.h>, and capset(2)'s header version, from <linux/capability.h>.
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522

DEVICES = ("null", "zero", "random", "urandom")  # the only devices the code sees
HOST_UID_MAP = ["0", "0", "4294967295"]  # /proc/self/uid_map outside any user namespace
# Audit events that start a process, and those that change a file by path.
SPAWN_EVENTS = frozenset(
    {
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.spawn",
        "os.exec",
        "os.system",
        "subprocess.Popen",
        "pty.spawn",
        "os.startfile",
    }
)
CHANGE_EVENTS = frozenset(
    {
        "os.remove",
        "os.rename",
        "os.rmdir",
        "os.mkdir",
        "os.chmod",
        "os.chown",
        "os.symlink",
        "os.link",
        "os.truncate",
        "os.utime",
        "shutil.rmtree",
        "shutil.move",
        "shutil.copyfile",
        "os.mkfifo",
    }
)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PRIVATE_PROC_FILE = re.compile(r"/proc/(\d+)/(environ|cmdline|mem)$")


@dataclass(frozen=True)
class Settings:
    """What the parent tells the child, as JSON in its one argument."""

    workdir: str  # the run's folder, holding main.py: the only place the code may write
    report: str  # a folder outside it, where the child leaves notes for the parent
    namespace: bool  # started under `unshare`: set the namespaces up
    guards: bool  # install the audit hook
    allow_subprocess: bool
    cpu_seconds: int
    memory_mb: int
    max_file_mb: int
    max_processes: int
    nproc: int | None  # RLIMIT_NPROC, which counts all of the real uid's processes; None as root

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class _Libc:
    """The two system calls Python does not wrap, mount(2) and prctl(2), raising OSError."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True)

    def mount(self, src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        if self.lib.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount {target}: {os.strerror(e)}")

    def prctl(self, option: int, arg: int) -> int:
        return self.lib.prctl(option, arg, 0, 0, 0)


def set_up_namespace(cfg: Settings) -> None:
    """Inside fresh user, pid, net and mount namespaces: make everything read-only but the working
    folder, give /dev only harmless devices, cap the processes, then drop every capability."""
    # Touch nothing unless this really is the new namespaces: pid 1 of a fresh pid namespace, in a
    # user namespace that is not the host's identity map. Run on the host by mistake (as root), the
    # mounts and the pid_max write below would change the host itself.
    with open("/proc/self/uid_map") as f:
        on_host = f.read().split()[:3] == HOST_UID_MAP
    if os.getpid() != 1 or on_host:
        raise RuntimeError("not inside the sandbox's namespaces; refusing to set them up")
    libc = _Libc()
    work = cfg.workdir
    # The working folder: a bind mount of itself, which stays writable when the rest goes read-only.
    libc.mount(work, work, None, MS_BIND)
    os.chdir(work)  # the old cwd is on the mount below, about to become read-only
    devices = _private_dev(libc)
    _cap_processes(cfg)
    # Everything else: read-only, nodev, nosuid.
    seen = set()
    with open("/proc/self/mountinfo") as f:
        mounts = f.read().splitlines()
    for line in reversed(mounts):  # the topmost mount of a point is listed last
        parts = line.split()
        point = parts[4].encode().decode("unicode_escape")
        if point in seen or point == work or point.startswith(("/proc/", "/dev/")) or not os.path.exists(point):
            continue
        seen.add(point)
        opts = parts[5].split(",")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | (MS_NOEXEC if "noexec" in opts else 0)
        flags |= sum(v for k, v in ATIME_FLAGS.items() if k in opts)
        if point == "/dev":
            flags &= ~MS_NODEV  # the device binds themselves
        libc.mount(None, point, None, flags)
    for name in devices:
        libc.mount(None, "/dev/" + name, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    libc.mount(None, "/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    libc.mount(None, work, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    _drop_capabilities(libc)


def _private_dev(libc: _Libc) -> list[str]:
    """/dev as a small tmpfs holding only DEVICES, bound from the real ones through fds opened first."""
    fds = {name: os.open("/dev/" + name, os.O_RDONLY) for name in DEVICES if os.path.exists("/dev/" + name)}
    libc.mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name, fd in fds.items():
        open("/dev/" + name, "w").close()
        libc.mount(f"/proc/self/fd/{fd}", "/dev/" + name, None, MS_BIND)
        os.close(fd)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, "/dev/" + name)
    return list(fds)


def _cap_processes(cfg: Settings) -> None:
    """The pid namespace's own pid cap (Linux 6.14+), which bounds a fork bomb even where RLIMIT_NPROC
    does not bind (host root), and no nested user namespaces (they could not undo the locks, but
    there is no need for them)."""
    try:
        with open("/proc/sys/kernel/pid_max", "w") as f:
            f.write(str(max(301, cfg.max_processes + 1)))  # 301: the kernel's minimum
        open(os.path.join(cfg.report, PID_MAX_NOTE), "w").close()
    except OSError:
        pass
    try:
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
    except OSError:
        pass


def _drop_capabilities(libc: _Libc) -> None:
    """No capability now, none after an exec (an empty bounding set), and no setuid gains."""
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap) == 0:  # until EINVAL, past the last capability
        cap += 1
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)  # 0: this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable, two words each: all empty
    if libc.lib.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def apply_limits(cfg: Settings) -> None:
    """CPU time, address space, file size and process count, and no core dumps."""
    mb = 1024 * 1024
    for name, value in (
        ("RLIMIT_CPU", cfg.cpu_seconds),
        ("RLIMIT_AS", cfg.memory_mb * mb),
        ("RLIMIT_FSIZE", cfg.max_file_mb * mb),
        ("RLIMIT_NPROC", cfg.nproc),
        ("RLIMIT_CORE", 0),
    ):
        if value is None or not hasattr(resource, name):
            continue
        kind = getattr(resource, name)
        hard = resource.getrlimit(kind)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # The CPU hard limit one second later: SIGXCPU first, then SIGKILL if it is ignored.
        later = name == "RLIMIT_CPU" and hard == resource.RLIM_INFINITY
        resource.setrlimit(kind, (value, value + 1 if later else value))


def install_guard(workdir: str, allow_subprocess: bool) -> None:
    """A PEP 578 audit hook that refuses sockets, process creation (unless allowed), writes and
    changes outside the working folder, and other processes' environ, cmdline and memory."""
    # The hook reads its tables from its closure, not from this module's globals, which the program
    # could reach through its frames and rebind.
    real_work = os.path.realpath(workdir)
    spawn, changes, write_flags, private = SPAWN_EVENTS, CHANGE_EVENTS, WRITE_FLAGS, PRIVATE_PROC_FILE

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        path = os.path.realpath(os.fsdecode(path))
        return path == real_work or path.startswith(real_work + os.sep) or path == os.devnull

    def hook(event: str, args: tuple) -> None:
        if event.startswith("socket."):
            raise PermissionError("sandbox: network access is disabled")
        if event in spawn and not allow_subprocess:
            raise PermissionError(f"sandbox: creating processes is disabled ({event})")
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            text = os.fsdecode(path)
            m = private.match(os.path.realpath(text) if text.startswith("/proc") else text)
            if m and int(m.group(1)) != os.getpid():
                raise PermissionError("sandbox: other processes' memory and environment are off limits")
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working folder is not allowed: {text}")
        elif event in changes:
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
            if any(not inside(p) for p in paths):
                raise PermissionError(f"sandbox: changing files outside the working folder is not allowed ({event})")

    sys.addaudithook(hook)


def main(settings: str) -> None:
    cfg = Settings(**json.loads(settings))
    try:
        if cfg.namespace:
            set_up_namespace(cfg)
        else:
            os.chdir(cfg.workdir)
        apply_limits(cfg)
    except Exception as e:
        print(f"sandbox setup failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(SETUP_FAILED)
    os.environ.clear()
    if cfg.guards:
        install_guard(cfg.workdir, cfg.allow_subprocess)
    sys.argv = ["main.py"]
    sys.path.insert(0, cfg.workdir)
    runpy.run_path(os.path.join(cfg.workdir, "main.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1])
