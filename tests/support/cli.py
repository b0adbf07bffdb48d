"""Running the `peerpull` command as a user would, and reading its final error line.

With default settings and stderr not a terminal, logs and the final error are JSON lines; the
error is always the last line, alone. `final_error` reads it in either format.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class FinalError:
    message: str
    exit_code: int | None  # as the JSON line states it (None for the console format)
    lines: int  # stderr lines in all


def peerpull_cmd(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
    """`peerpull ARGS` with the user's defaults (no --log-level), output captured."""
    return subprocess.run([sys.executable, "-m", "peerpull", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, input=input, stdin=None if input is not None else subprocess.DEVNULL)


def final_error(stderr: str) -> FinalError:
    """The last stderr line as an error; AssertionError if it is not one."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert "Traceback" not in stderr, stderr[-3000:]
    if last.startswith("{"):
        record = json.loads(last)
        assert record.get("event") == "command_failed" and record.get("level") == "error", last
        return FinalError(str(record["error"]), int(record["exit_code"]), len(lines))
    assert last.startswith("peerpull: error: "), last
    return FinalError(last[len("peerpull: error: "):], None, len(lines))


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, needle: str) -> FinalError:
    """Exit `code`, the last stderr line names `needle`, and no warning/error lines of retries precede it."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    err = final_error(result.stderr)
    assert needle in err.message, err.message
    assert err.exit_code in (None, code)
    noisy = [line for line in result.stderr.splitlines()[:-1] if '"level": "info"' in line and "retry" in line]
    assert not noisy, noisy
    return err


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float  # the process's own peak resident set
    seconds: float


# A small launcher forks (a real fork, not vfork) and execs the command, then reports the child's
# ru_maxrss. Measuring a direct child of pytest would not do: exec records the high-water mark of
# the mm it replaces, and a vfork'd child shares pytest's, so every figure would be pytest's size.
_LAUNCHER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def peerpull_measured(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Measured:
    """Run `peerpull ARGS` and measure its peak RSS; killed (and returncode -9) after `timeout`."""
    import os
    import signal
    import tempfile
    import time

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".maxrss") as rss:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, rss.name, sys.executable, "-m", "peerpull", *args],
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = -9
        seconds = time.monotonic() - started
        text = open(rss.name).read().strip()
        out.seek(0)
        err.seek(0)
        return Measured(returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                        int(text) / 1024 if text else 0.0, seconds)
