"""Run untrusted Python (generated code and its tests) out of process, contained.

Every run gets a fresh temporary folder as its working directory, an empty environment, a wall-clock
timeout, and CPU, memory, process-count and file-size limits; at the end everything it spawned is
killed. Two layers do the containing:

- The operating system, where Linux lets an unprivileged process build namespaces (`unshare`): a
  user namespace (so the rest needs no privilege), a network namespace (no interfaces but a
  loopback that is down: no network at all), a pid namespace (the code sees only its own processes,
  and killing its first process kills them all, even those that called setsid), and a mount
  namespace in which every filesystem is remounted read-only, nodev and nosuid except the working
  folder, /dev is a small tmpfs holding only null, zero, random and urandom, and /proc shows only
  the namespace. Then every capability is dropped (no_new_privs, empty bounding set), so the code
  cannot undo any of it. The process count is capped by RLIMIT_NPROC, and where the process runs as
  host root (which RLIMIT_NPROC does not bind) by the pid namespace's own pid_max (Linux 6.14+).
- Python, inside the child: an audit hook (PEP 578) refuses sockets, process creation, and writes
  outside the working folder with a clear PermissionError. It is what contains the code where the
  namespaces are not available (macOS, containers that forbid user namespaces); there it is a
  speed bump, not a wall, which `isolation()` reports.

The child is `python -I -B -X utf8 -c BOOT`, where BOOT (below) sets the namespace up, applies the
limits, installs the hook, then runs the program with `runpy`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

OUTPUT_LIMIT = 64 * 1024  # bytes of stdout/stderr kept in a result


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout | memory | killed | error
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    isolation: list[str] = field(default_factory=list)  # the protections that were in force
    workdir: str = ""  # the (since deleted) working folder, to look for leftovers in tests

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def error(self) -> str:
        """The exception line of a Python traceback, or what ended the run."""
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""

    def summary(self) -> str:
        """One line that says what happened."""
        if self.status == "passed":
            return f"passed ({self.duration:.2f}s)"
        if self.status == "timeout":
            return f"timeout: stopped after {self.duration:.1f}s"
        if self.status == "memory":
            return f"memory limit exceeded ({self.error or 'killed'})"
        if self.status == "killed":
            name = _signal_name(-(self.returncode or 0))
            return f"file size limit exceeded ({name})" if name == "SIGXFSZ" else f"killed by {name}"
        return f"{self.status}: {self.error or f'exit status {self.returncode}'}"


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


# ---- the child ------------------------------------------------------------------------------------------

# Runs as the child's first Python code; its one argument is the JSON settings. Failures while setting
# up exit with status 125 and a "sandbox setup failed" line, before any of the program runs.
_BOOT = r"""
import json, os, sys
cfg = json.loads(sys.argv[1])
work = cfg["workdir"]

def _setup_namespace():
    import ctypes, errno
    # Touch nothing unless this really is the new namespaces: pid 1 of a fresh pid namespace, in a
    # user namespace that is not the host's identity map. Run on the host by mistake (as root), the
    # mounts and the pid_max write below would change the host itself.
    if os.getpid() != 1 or open("/proc/self/uid_map").read().split()[:3] == ["0", "0", "4294967295"]:
        raise RuntimeError("not inside the sandbox's namespaces; refusing to set them up")
    libc = ctypes.CDLL(None, use_errno=True)
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND = 1, 2, 4, 8, 32, 4096
    ATIME = {"noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}

    def mount(src, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount {target}: {os.strerror(e)}")

    # The working folder: a bind mount of itself, which stays writable when the rest goes read-only.
    mount(work, work, None, BIND)
    os.chdir(work)  # the old cwd is on the mount below, about to become read-only
    # /dev: a tmpfs with only the harmless devices, bound from the real ones through open fds.
    devices = {name: os.open("/dev/" + name, os.O_RDONLY) for name in ("null", "zero", "random", "urandom")
               if os.path.exists("/dev/" + name)}
    mount("tmpfs", "/dev", "tmpfs", NOSUID | NOEXEC, "size=64k,mode=755")
    for name, fd in devices.items():
        open("/dev/" + name, "w").close()
        mount(f"/proc/self/fd/{fd}", "/dev/" + name, None, BIND)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, "/dev/" + name)
    # The pid namespace's own pid cap (Linux 6.14+): bounds a fork bomb even where RLIMIT_NPROC does not
    # bind (host root). 301 is the kernel's minimum.
    try:
        with open("/proc/sys/kernel/pid_max", "w") as f:
            f.write(str(max(301, cfg["max_processes"] + 1)))
        open(os.path.join(cfg["report"], "pid_max"), "w").close()
    except OSError:
        pass
    try:  # no nested user namespaces either (they could not undo the locks, but there is no need)
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
    except OSError:
        pass
    # Everything else: read-only, nodev, nosuid. Remounting a bind keeps the flags the kernel locked
    # (noexec, atime), so they are carried over from mountinfo.
    seen = set()
    for line in reversed(open("/proc/self/mountinfo").read().splitlines()):
        parts = line.split()
        point = parts[4].encode().decode("unicode_escape")
        if point in seen or point == work or point.startswith(("/proc/", "/dev/")) or not os.path.exists(point):
            continue
        seen.add(point)
        opts = parts[5].split(",")
        flags = REMOUNT | BIND | RDONLY | NOSUID | NODEV | (NOEXEC if "noexec" in opts else 0)
        flags |= sum(v for k, v in ATIME.items() if k in opts)
        if point == "/dev" or point.startswith("/dev/"):
            flags &= ~NODEV  # the device binds themselves
        mount(None, point, None, flags)
    for name in devices:
        mount(None, "/dev/" + name, None, REMOUNT | BIND | RDONLY | NOSUID)
    mount(None, "/dev", None, REMOUNT | BIND | RDONLY | NOSUID | NOEXEC)
    mount(None, work, None, REMOUNT | BIND | NOSUID | NODEV)
    # Drop every capability for good: none now, none after an exec (empty bounding set), no setuid gains.
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    cap = 0
    while libc.prctl(24, cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP, until EINVAL past the last capability
        cap += 1
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2 words): all empty
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")

def _limits():
    import resource
    mb = 1024 * 1024
    for name, value in (("RLIMIT_CPU", cfg["cpu_seconds"]), ("RLIMIT_AS", cfg["memory_mb"] * mb),
                        ("RLIMIT_FSIZE", cfg["max_file_mb"] * mb), ("RLIMIT_NPROC", cfg["nproc"]),
                        ("RLIMIT_CORE", 0)):
        if value is not None and hasattr(resource, name):
            kind = getattr(resource, name)
            hard = resource.getrlimit(kind)[1]
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            # The CPU hard limit one second later: SIGXCPU first, then SIGKILL if it is ignored.
            resource.setrlimit(kind, (value, value + 1 if name == "RLIMIT_CPU" and hard == resource.RLIM_INFINITY
                                      else value))

def _guard():
    import re
    real_work = os.path.realpath(work)
    allow_procs = cfg["allow_subprocess"]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    spawn = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
             "pty.spawn", "os.startfile"}
    changes = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
               "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.mkfifo"}
    environ = re.compile(r"/proc/(\d+)/(environ|cmdline|mem)$")

    def inside(path):
        if isinstance(path, int):
            return True
        path = os.path.realpath(os.fsdecode(path))
        return path == real_work or path.startswith(real_work + os.sep) or path == os.devnull

    def hook(event, args):
        if event.startswith("socket."):
            raise PermissionError("sandbox: network access is disabled")
        if event in spawn and not allow_procs:
            raise PermissionError(f"sandbox: creating processes is disabled ({event})")
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            text = os.fsdecode(path)
            m = environ.match(os.path.realpath(text) if text.startswith("/proc") else text)
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

try:
    if cfg["namespace"]:
        _setup_namespace()
    else:
        os.chdir(work)
    _limits()
except Exception as e:
    print(f"sandbox setup failed: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(125)
del _setup_namespace, _limits
os.environ.clear()
if cfg["guards"]:
    _guard()
del _guard, cfg, json
import runpy
sys.argv = ["main.py"]
sys.path.insert(0, work)
runpy.run_path(os.path.join(work, "main.py"), run_name="__main__")
"""

_UNSHARE = [
    "unshare",
    "--user",
    "--map-root-user",
    "--mount",
    "--net",
    "--pid",
    "--ipc",
    "--uts",
    "--fork",
    "--kill-child",
    "--mount-proc",
    "--",
]


@functools.cache
def namespaces_available() -> bool:
    """Whether this machine lets us build the namespace sandbox (tried once, with a program that does nothing)."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    result = _run(
        "pass\n",
        {},
        timeout=30.0,
        memory_mb=1024,
        max_processes=32,
        max_file_mb=16,
        guards=True,
        allow_subprocess=False,
        namespace=True,
    )
    return result.returncode == 0


def isolation() -> list[str]:
    """What a run gets on this machine, in words."""
    layers = [
        "subprocess",
        "wall-clock timeout",
        "RLIMIT_CPU/AS/FSIZE/NPROC",
        "fresh temporary folder",
        "empty environment",
        "process group killed at the end",
        "Python audit hook",
    ]
    if namespaces_available():
        layers += ["user+pid+net+mount namespaces", "read-only filesystem outside the folder", "no capabilities"]
    return layers


def run_python(
    code: str,
    files: dict[str, str] | None = None,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_processes: int = 32,
    max_file_mb: int = 16,
    guards: bool = True,
    allow_subprocess: bool = False,
) -> SandboxResult:
    """Run a Python program in the sandbox and say how it went.

    Args:
        code: the program; it runs as `main.py` in a fresh temporary folder, as `__main__`.
        files: more files to put beside it, {relative name: text}.
        timeout: wall-clock seconds before everything is killed (the CPU limit is the same, rounded up).
        memory_mb: the address-space limit of each process.
        max_processes: how many processes it may have at once (RLIMIT_NPROC, or the pid
            namespace's pid_max, whose floor is 300, where it runs as host root).
        max_file_mb: the largest file it may write (its stdout and stderr included).
        guards: install the Python audit hook (sockets, process creation, writes outside the folder).
            Turn it off only to test the operating-system layer alone.
        allow_subprocess: let the program start processes (still counted by max_processes).
    """
    return _run(
        code,
        files or {},
        timeout=timeout,
        memory_mb=memory_mb,
        max_processes=max_processes,
        max_file_mb=max_file_mb,
        guards=guards,
        allow_subprocess=allow_subprocess,
        namespace=namespaces_available(),
    )


def _user_processes() -> int:
    """Processes of this real uid; RLIMIT_NPROC counts them all, so the limit is set above them."""
    uid, n = os.getuid(), 0
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    n += any(line.startswith("Uid:") and int(line.split()[1]) == uid for line in f)
            except (OSError, ValueError):
                pass
    return n


def _run(
    code: str,
    files: dict[str, str],
    *,
    timeout: float,
    memory_mb: int,
    max_processes: int,
    max_file_mb: int,
    guards: bool,
    allow_subprocess: bool,
    namespace: bool,
) -> SandboxResult:
    base = os.path.realpath(tempfile.mkdtemp(prefix="qwenkit-sandbox-"))
    work = os.path.join(base, "work")
    report = os.path.join(base, "report")
    os.mkdir(work)
    os.mkdir(report)
    try:
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        for name, text in files.items():
            path = os.path.realpath(os.path.join(work, name))
            if not path.startswith(work + os.sep):
                raise ValueError(f"file name {name!r} leaves the working folder")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        settings = {
            "workdir": work,
            "report": report,
            "namespace": namespace,
            "guards": guards,
            "allow_subprocess": allow_subprocess,
            "cpu_seconds": int(timeout) + 1,
            "memory_mb": memory_mb,
            "max_file_mb": max_file_mb,
            "max_processes": max_processes,
            "nproc": None if os.getuid() == 0 else _user_processes() + max_processes,
        }
        argv = [sys.executable, "-I", "-B", "-X", "utf8", "-c", _BOOT, json.dumps(settings)]
        if namespace:
            argv = _UNSHARE + argv
        # stdout/stderr go to files outside the folder: RLIMIT_FSIZE bounds them, so an endless print
        # cannot fill the host's memory the way a pipe read to the end would.
        with open(os.path.join(base, "stdout"), "w+b") as out, open(os.path.join(base, "stderr"), "w+b") as err:
            start = time.monotonic()
            proc = subprocess.Popen(
                argv, cwd=work, env={}, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
            timed_out = False
            try:
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                duration = time.monotonic() - start
            finally:
                _kill_group(proc)  # also on Ctrl-C: nothing outlives the run
            stdout, stderr = _read(out), _read(err)
        layers = ["subprocess", "timeout", "rlimits", "empty environment", "fresh folder"]
        if namespace:
            layers += ["namespaces", "read-only filesystem", "no network", "no capabilities"]
            if os.path.exists(os.path.join(report, "pid_max")):
                layers.append("pid_max")
        if guards:
            layers.append("audit hook")
        return SandboxResult(
            _status(proc.returncode, timed_out, stderr),
            None if timed_out else proc.returncode,
            stdout,
            stderr,
            duration,
            layers,
            work,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _pid_namespace(proc: subprocess.Popen) -> str | None:
    """The pid namespace `unshare` made for its child (None once it has gone)."""
    try:
        return os.readlink(f"/proc/{proc.pid}/ns/pid_for_children")
    except OSError:
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group, and wait until they are all gone.

    In the namespace sandbox the group leader is `unshare`; its death kills the namespace's first
    process (--kill-child), and the kernel then kills every process in the namespace, including any
    that left the group with setsid. That happens asynchronously, so we wait for the namespace to
    empty: when this returns, nothing the code started is still running. (When `unshare` has already
    exited, so has the namespace: its first process outlives all the others.)
    """
    namespace = _pid_namespace(proc) if proc.poll() is None else None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if namespace is None or namespace == _own_pid_namespace():
        return
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and _members(namespace):
        time.sleep(0.02)


@functools.cache
def _own_pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _members(namespace: str) -> list[int]:
    """Processes, seen from here, that live in the given pid namespace."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/ns/pid") == namespace:
                    found.append(int(pid))
            except OSError:
                pass
    return found


def _read(f) -> str:
    f.seek(0)
    data = f.read(OUTPUT_LIMIT + 1)
    text = data[:OUTPUT_LIMIT].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > OUTPUT_LIMIT else "")


def _status(returncode: int | None, timed_out: bool, stderr: str) -> str:
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if last.startswith("MemoryError") or "Cannot allocate memory" in last:
        return "memory"
    if returncode == 125 and last.startswith("sandbox setup failed"):
        return "error"
    if returncode is not None and returncode < 0:
        return "killed"
    return "failed"


# ---- HumanEval-style checking --------------------------------------------------------------------------


def check_program(program: str, test: str, entry_point: str | None = None) -> str:
    """The program HumanEval runs: the solution, its tests, then `check(entry_point)` when the tests
    define a `check` function (as HumanEval's do); plain asserts run as they are."""
    tail = f"\n\ncheck({entry_point})\n" if entry_point and "def check(" in test else "\n"
    return f"{program}\n\n{test}{tail}"


def run_tests(
    program: str, test: str, entry_point: str | None = None, *, timeout: float = 10.0, memory_mb: int = 1024
) -> SandboxResult:
    """Run a solution against its tests in the sandbox.

    Args:
        program: the solution's full source (for HumanEval: the prompt with the completion appended).
        test: the test code: asserts, or a HumanEval `check(candidate)` function.
        entry_point: the function `check` is called with.
        timeout: wall-clock seconds.
        memory_mb: the address-space limit.
    """
    return run_python(check_program(program, test, entry_point), timeout=timeout, memory_mb=memory_mb)
