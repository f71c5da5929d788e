"""Run untrusted Python (generated code and its tests) out of process, contained.

Each run is `python -I -B -X utf8 child.py SETTINGS` (`sandbox/child.py`, the child's whole program),
under `unshare` where Linux lets an unprivileged process build namespaces. The child sets the
namespaces up, applies the limits, installs the audit hook, then runs the code as `main.py`.

What is covered, by the names `isolation()` and each `SandboxResult.isolation` report:

- subprocess: the code runs in a Python process of its own, in isolated mode, never in ours.
- wall-clock timeout: at `timeout` seconds everything it started is killed; RLIMIT_CPU stops a
  busy loop a second later in CPU time, should we be slow to.
- resource limits: address space (`memory_mb`, per process), file size (`max_file_mb`, its stdout
  and stderr included), process count (RLIMIT_NPROC, `max_processes`), no core dumps.
- fresh temporary folder: its working directory, made for the run and deleted after it.
- empty environment: no variable of ours (a token, a key) reaches it.
- process group killed at the end: nothing it started outlives the run.
- Python audit hook: a PEP 578 hook makes sockets, process creation, writes and changes outside
  the folder, and reading other processes' environ, cmdline and memory raise a PermissionError.
- user+pid+net+mount namespaces: it sees only its own processes, and when its first process dies
  the kernel kills the rest, even those that called setsid.
- no network: the network namespace has only a loopback, and that is down.
- read-only filesystem outside the folder: every mount is remounted read-only, nodev and nosuid;
  /dev holds only null, zero, random and urandom; /proc shows only the namespace.
- no capabilities: no_new_privs and an empty bounding set, so the code cannot undo any of it.
- pid_max: the pid namespace's own cap on processes (Linux 6.14+), which binds where
  RLIMIT_NPROC does not, when we run as host root.

What is not covered:

- Without the namespaces (macOS, containers that forbid user namespaces) only the limits and the
  audit hook stand: a speed bump, not a wall (ctypes, for one, gets past the hook).
- Reading: the host's files that our user can read stay readable; read-only is not hidden.
- The kernel: it is shared, with no seccomp filter, so a kernel exploit escapes.
- Disk: RLIMIT_FSIZE bounds each file, not how many the folder gets until the timeout.
- Memory across processes: RLIMIT_AS is per process, so `max_processes` of them may each take
  `memory_mb`; there is no cgroup.
- CPU contention and timing side channels with the host.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from qwenkit.errors import UserError
from qwenkit.tasks.sandbox import child

CHILD = os.path.abspath(child.__file__)

OUTPUT_LIMIT = 64 * 1024  # bytes of stdout/stderr kept in a result


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout | memory | killed | error
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    isolation: list[str] = field(default_factory=list)  # the protections in force, by PROTECTIONS' names
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


# ---- what is covered ------------------------------------------------------------------------------------

# The protections by the names of the module docstring's list, grouped by when they are in force.
ALWAYS = (
    "subprocess",
    "wall-clock timeout",
    "resource limits",
    "fresh temporary folder",
    "empty environment",
    "process group killed at the end",
)
AUDIT_HOOK = "Python audit hook"  # unless a run turns the guards off
NAMESPACES = (  # where `namespaces_available()`
    "user+pid+net+mount namespaces",
    "no network",
    "read-only filesystem outside the folder",
    "no capabilities",
)
PID_MAX = "pid_max"  # where the child could set it
PROTECTIONS = (*ALWAYS, AUDIT_HOOK, *NAMESPACES, PID_MAX)


def protections(*, namespace: bool, guards: bool, pid_max: bool) -> list[str]:
    """The names of the protections in force in a run with these layers."""
    return [
        *ALWAYS,
        *([AUDIT_HOOK] if guards else []),
        *(NAMESPACES if namespace else ()),
        *([PID_MAX] if pid_max else []),
    ]


# ---- running ------------------------------------------------------------------------------------------

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
def _namespace_probe() -> SandboxResult | None:
    """A run of a program that does nothing in the namespace sandbox (once), or None where there is
    no `unshare` to try it with."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return None
    return _run(
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


def namespaces_available() -> bool:
    """Whether this machine lets us build the namespace sandbox."""
    probe = _namespace_probe()
    return probe is not None and probe.returncode == 0


def isolation() -> list[str]:
    """The protections a run gets on this machine (with the audit hook on), by the names of the
    module docstring's list."""
    if namespaces_available():
        return list(_namespace_probe().isolation)
    return protections(namespace=False, guards=True, pid_max=False)


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
                raise UserError(f"file name {name!r} leaves the working folder")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        settings = child.Settings(
            workdir=work,
            report=report,
            namespace=namespace,
            guards=guards,
            allow_subprocess=allow_subprocess,
            cpu_seconds=int(timeout) + 1,
            memory_mb=memory_mb,
            max_file_mb=max_file_mb,
            max_processes=max_processes,
            nproc=None if os.getuid() == 0 else _user_processes() + max_processes,
        )
        argv = [sys.executable, "-I", "-B", "-X", "utf8", CHILD, settings.to_json()]
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
        pid_max = namespace and os.path.exists(os.path.join(report, child.PID_MAX_NOTE))
        return SandboxResult(
            _status(proc.returncode, timed_out, stderr),
            None if timed_out else proc.returncode,
            stdout,
            stderr,
            duration,
            protections(namespace=namespace, guards=guards, pid_max=pid_max),
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
    if returncode == child.SETUP_FAILED and last.startswith("sandbox setup failed"):
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
