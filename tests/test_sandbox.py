"""The code sandbox, for real: correct solutions pass, wrong ones fail, and hostile programs (an
infinite loop, a fork bomb, a memory bomb, writing outside the folder, reading the parent's
environment, opening a socket) are contained with a clear result while the host stays unharmed."""

import json
import os
import socket
import sys
import time

import pytest

from qwenkit.tasks import sample_data, sandbox
from qwenkit.tasks.sandbox import child


def survivors(workdir: str) -> list[int]:
    """Host processes still running the sandboxed program (its settings, in its command line, name its folder)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if workdir.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def humaneval_problem(entry_point: str) -> dict:
    rows = [json.loads(line) for line in sample_data("code").read_text().splitlines()]
    return next(r for r in rows if r["entry_point"] == entry_point)


def test_correct_solution_passes_and_wrong_one_fails():
    row = humaneval_problem("is_prime")
    good = sandbox.run_tests(row["prompt"] + row["canonical_solution"], row["test"], row["entry_point"], timeout=10)
    assert good.status == "passed" and good.passed and good.returncode == 0, good.stderr
    wrong = row["prompt"] + "    return n % 2 == 1\n"  # odd numbers are not the primes
    bad = sandbox.run_tests(wrong, row["test"], row["entry_point"], timeout=10)
    assert bad.status == "failed" and not bad.passed and "AssertionError" in bad.error
    crash = sandbox.run_tests(row["prompt"] + "    return undefined_name\n", row["test"], row["entry_point"])
    assert crash.status == "failed" and "NameError" in crash.error


def test_fresh_folder_and_empty_environment():
    # LC_CTYPE is Python's own locale coercion (PEP 538) in the child, not something inherited.
    result = sandbox.run_python(
        "import os\nprint(os.listdir('.'))\n"
        "print(sorted(k for k in os.environ if k != 'LC_CTYPE'))\n"
        "open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n"
    )
    assert result.passed, result.stderr
    assert result.stdout.splitlines() == ["['main.py']", "[]", "ok"]
    assert not os.path.exists(result.workdir)  # removed afterwards


def test_infinite_loop_times_out_and_is_killed():
    start = time.monotonic()
    result = sandbox.run_python("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout" and not result.passed
    assert "timeout" in result.summary()
    assert time.monotonic() - start < 10
    assert survivors(result.workdir) == []


def test_fork_bomb_is_contained():
    result = sandbox.run_python("import os\nwhile True:\n    os.fork()\n", timeout=5.0)
    assert result.status in ("failed", "timeout", "killed") and not result.passed
    assert survivors(result.workdir) == []


def test_memory_bomb_hits_the_limit():
    result = sandbox.run_python(
        "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n", timeout=20.0, memory_mb=512
    )
    assert result.status == "memory" and not result.passed
    assert "memory limit" in result.summary()


def test_writing_outside_the_folder_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    code = (
        f"import os, pathlib\ntarget = {str(target)!r}\nerrors = []\n"
        "for attempt in (lambda: open(target, 'w').write('x'), lambda: pathlib.Path(target).write_text('x'),\n"
        "                lambda: os.system('touch ' + target), lambda: open('../escaped', 'w').write('x')):\n"
        "    try:\n        attempt()\n    except Exception as e:\n        errors.append(type(e).__name__)\n"
        "print(errors)\nassert len(errors) == 4\n"
    )
    result = sandbox.run_python(code)
    assert result.passed, result.stderr  # every attempt raised inside the program
    assert not target.exists() and not (tmp_path / "escaped").exists()
    plain = sandbox.run_python(f"open({str(target)!r}, 'w').write('x')\n")
    assert plain.status == "failed" and ("PermissionError" in plain.error or "Read-only" in plain.error)
    assert not target.exists()


def test_the_parents_environment_is_out_of_reach(monkeypatch):
    secret = f"s3cret-{os.getpid()}-{time.time_ns()}"
    monkeypatch.setenv("QWENKIT_TEST_SECRET", secret)
    code = (
        "import os, glob\nprint(dict(os.environ))\n"
        f"for path in glob.glob('/proc/*/environ') + ['/proc/{os.getpid()}/environ']:\n"
        "    try:\n        print(path, open(path, 'rb').read())\n    except OSError as e:\n        print(path, e)\n"
        "print('done')\n"
    )
    result = sandbox.run_python(code)
    assert result.passed and result.stdout.rstrip().endswith("done"), result.stderr
    assert secret not in result.stdout and secret not in result.stderr


def test_sockets_are_refused():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        result = sandbox.run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n")
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever connected
    assert result.status == "failed" and ("PermissionError" in result.error or "OSError" in result.error)


def test_endless_output_is_bounded():
    result = sandbox.run_python("while True:\n    print('x' * 1000)\n", timeout=20.0, max_file_mb=1)
    assert not result.passed and len(result.stdout) <= sandbox.OUTPUT_LIMIT + 100


# ---- the operating-system layer alone (the Python audit hook off) ------------------------------------

namespaces = pytest.mark.skipif(
    not sandbox.namespaces_available(), reason="this machine does not allow unprivileged user namespaces"
)


@namespaces
def test_os_layer_makes_the_filesystem_read_only(tmp_path):
    target = tmp_path / "escaped.txt"
    result = sandbox.run_python(f"open({str(target)!r}, 'w').write('x')\n", guards=False)
    assert result.status == "failed" and "Read-only file system" in result.error
    assert not target.exists()
    # and the code cannot undo it: no capabilities are left to remount with
    remount = sandbox.run_python(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.mount(None, b'/', None, {child.MS_REMOUNT | child.MS_BIND}, None) != 0\n"
        "assert libc.umount2(b'/dev', 2) != 0\n",  # 2: MNT_DETACH
        guards=False,
    )
    assert remount.passed, remount.stderr


@namespaces
def test_os_layer_has_no_network():
    result = sandbox.run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=3)\n", guards=False)
    assert result.status == "failed" and "unreachable" in result.error.lower()


@namespaces
def test_os_layer_hides_the_host_processes(monkeypatch):
    secret = f"s3cret-{time.time_ns()}"
    monkeypatch.setenv("QWENKIT_TEST_SECRET", secret)
    code = (
        "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "for p in os.listdir('/proc'):\n    if p.isdigit():\n"
        "        print(open(f'/proc/{p}/environ', 'rb').read())\n"
    )
    result = sandbox.run_python(code, guards=False)
    assert result.passed, result.stderr
    assert result.stdout.splitlines()[0] == "[1]"  # only itself, pid 1 of its own namespace
    assert secret not in result.stdout


@pytest.mark.slow
@namespaces
def test_os_layer_contains_a_fork_bomb_that_survives_its_errors():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = sandbox.run_python(code, timeout=3.0, guards=False)
    assert result.status == "timeout"
    assert survivors(result.workdir) == []
    assert "pid_max" in result.isolation or os.getuid() != 0  # as root, only pid_max bounds it


def test_isolation_is_reported():
    layers = sandbox.isolation()
    assert "wall-clock timeout" in layers and "Python audit hook" in layers
    if sys.platform == "linux" and sandbox.namespaces_available():
        assert "read-only filesystem outside the folder" in layers


def test_the_child_is_a_real_module_run_in_isolated_mode():
    assert sandbox.CHILD.endswith("child.py") and os.path.isfile(sandbox.CHILD)
    result = sandbox.run_python(
        "import sys\nprint(sys.flags.isolated, sys.flags.dont_write_bytecode, sys.flags.utf8_mode)\n"
        "print(any(m == 'qwenkit' or m.startswith('qwenkit.') for m in sys.modules))\n"
    )
    assert result.passed, result.stderr
    assert result.stdout.split() == ["1", "1", "1", "False"]  # -I -B -X utf8, and nothing of qwenkit loaded


def test_the_docstring_lists_what_isolation_reports():
    doc = sandbox.__doc__
    covered = doc[doc.index("What is covered") : doc.index("What is not covered")]
    bullets = [line[2:].split(":")[0] for line in covered.splitlines() if line.startswith("- ")]
    assert bullets == list(sandbox.PROTECTIONS)
    assert set(sandbox.isolation()) <= set(sandbox.PROTECTIONS)
    result = sandbox.run_python("pass\n", guards=False)
    assert set(result.isolation) <= set(sandbox.PROTECTIONS) and "Python audit hook" not in result.isolation
    assert "wall-clock timeout" in result.isolation
