"""`peerpull clean` touches only what `peerpull run` created: ordinary directories, system
directories, forged or foreign markers and recycled PIDs are left alone; an interrupted run's
processes, mounts and directories are removed. Real processes and real set-ups throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerpull.testbed.process import mounts_under, start_time
from peerpull.testbed.setup_marker import MARKER_NAME, RecordedProcess, SetupMarker
from tests.support import images
from tests.support.cli import assert_one_line_error, peerpull_cmd
from tests.support.lazy_stack import LazyStack

pytestmark = [pytest.mark.root]


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("peerpull clean needs root")


@pytest.fixture
def bystander(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process whose command line names the test's directories."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(600)", str(tmp_path)],
                            stdin=subprocess.DEVNULL)
    yield proc
    proc.kill()
    proc.wait()


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _ordinary_dir(path: Path) -> list[str]:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("mine\n")
    (path / "sub" / "data.bin").write_bytes(b"x" * 1000)
    return _tree(path)


def test_an_ordinary_directory_and_a_process_naming_it_are_left_alone(tmp_path: Path, bystander) -> None:
    work = tmp_path / "work"
    _ordinary_dir(work)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep\n")
    # what the old clean trusted: a containerd.path naming a directory elsewhere
    (work / "sub" / "containerd.path").write_text(str(outside))
    before = _tree(work)
    r = peerpull_cmd("clean", "--work-root", str(work))
    assert r.returncode == 0, r.stderr
    assert "no peerpull run set-up found" in r.stdout
    assert _tree(work) == before and (outside / "precious").exists()
    assert _alive(bystander)


@pytest.mark.parametrize("where", ["/", "/tmp", "/var/tmp", "/run", "~", "/usr"])
def test_system_directories_are_refused(where: str, bystander) -> None:
    r = peerpull_cmd("clean", "--work-root", os.path.expanduser(where))
    assert_one_line_error(r, 2, "system directory")
    assert _alive(bystander)


def test_a_missing_work_root_is_no_set_up(tmp_path: Path) -> None:
    r = peerpull_cmd("clean", "--work-root", str(tmp_path / "nothing-here"))
    assert r.returncode == 0 and "no peerpull run set-up found" in r.stdout, r.stderr


def _forged_setup(path: Path, extra_dirs: list[str], processes: tuple[tuple[int, int], ...] = ()) -> SetupMarker:
    """A set-up as run writes it, with the given outside dirs and (PID, start time) records."""
    path.mkdir(parents=True)
    (path / "daemon").mkdir()
    marker = SetupMarker.create(path)
    marker.extra_dirs = extra_dirs
    for pid, started in processes:
        marker.processes.append(RecordedProcess("daemon", pid, started))
    marker.save()
    return marker


def test_a_marker_pointing_outside_its_set_up_removes_only_the_set_up(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep\n")
    foreign_run = Path(tempfile.mkdtemp(prefix="not-ours-", dir="/run"))  # under /run, not our prefix
    target = Path(tempfile.mkdtemp(prefix="pp-target-", dir=tmp_path))
    (target / "precious").write_text("keep\n")
    link = Path(f"/run/pp-run-link-{os.getpid()}")  # our prefix, but a symlink out of /run
    link.symlink_to(target)
    try:
        setup = tmp_path / "runs" / "one"
        _forged_setup(setup, [str(outside), str(foreign_run), str(link)])
        r = peerpull_cmd("clean", "--work-root", str(tmp_path / "runs"))
        assert r.returncode == 0, r.stderr
        assert "1 set-up(s) removed" in r.stdout, r.stdout
        assert not setup.exists()
        assert (outside / "precious").exists() and foreign_run.is_dir() and (target / "precious").exists()
        assert link.is_symlink()
        assert r.stdout.count("not removing") == 3, r.stdout
    finally:
        link.unlink()
        foreign_run.rmdir()


def test_a_marker_copied_from_another_set_up_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "runs" / "real"
    _forged_setup(real, [])
    copy = tmp_path / "runs" / "copy"
    copy.mkdir()
    (copy / "mine.txt").write_text("keep\n")
    shutil.copy(real / MARKER_NAME, copy / MARKER_NAME)  # names `real`, not `copy`
    os.chmod(copy / MARKER_NAME, 0o600)
    r = peerpull_cmd("clean", "--work-root", str(copy))
    assert_one_line_error(r, 2, "is not a peerpull run set-up")
    assert (copy / "mine.txt").exists() and real.exists()
    # among the children of a work root: that one is skipped, the real one removed
    r = peerpull_cmd("clean", "--work-root", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    assert "skipped:" in r.stdout and (copy / "mine.txt").exists() and not real.exists()


def test_a_marker_others_could_write_is_refused(tmp_path: Path) -> None:
    setup = tmp_path / "setup"
    _forged_setup(setup, [])
    os.chmod(setup / MARKER_NAME, 0o666)
    r = peerpull_cmd("clean", "--work-root", str(setup))
    assert_one_line_error(r, 2, "writable by others")
    assert (setup / "daemon").is_dir()


def test_a_recycled_pid_is_not_signalled(tmp_path: Path, bystander) -> None:
    """The marker records the bystander's PID with another start time: a PID reused since the run."""
    started = start_time(bystander.pid)
    assert started is not None
    setup = tmp_path / "setup"
    _forged_setup(setup, [], [(bystander.pid, started - 1)])
    r = peerpull_cmd("clean", "--work-root", str(setup))
    assert r.returncode == 0, r.stderr
    assert "0 process(es) stopped" in r.stdout and not setup.exists()
    assert _alive(bystander)


def test_a_recorded_process_that_is_still_ours_is_ended(tmp_path: Path) -> None:
    """Same PID and start time: it is the recorded process, and only it is ended."""
    ours = subprocess.Popen(["sleep", "600"])
    other = subprocess.Popen(["sleep", "600"])
    try:
        setup = tmp_path / "setup"
        _forged_setup(setup, [], [(ours.pid, start_time(ours.pid) or 0)])
        r = peerpull_cmd("clean", "--work-root", str(setup))
        assert r.returncode == 0, r.stderr
        assert ours.wait(30) == -signal.SIGTERM
        assert _alive(other)
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()


# ---- a real interrupted run ------------------------------------------------------------------

@pytest.fixture(scope="module")
def sleeper_image(lazy_stack: LazyStack) -> str:
    layout = lazy_stack.root / "sleeper"
    images.build_simple_image(layout, {"etc/hello": b"hello\n"},
                              cmd=["/bin/busybox", "sh", "-c", "echo started; exec /bin/busybox sleep 600"])
    source = images.push_layout(layout, lazy_stack.registry.address, "clean/sleeper")
    target = f"{lazy_stack.registry.address}/clean/sleeper:seekable"
    lazy_stack.convert(source, target, images.CHUNK)
    return target


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _running_tasks(socket: str) -> list[str]:
    r = subprocess.run(["ctr", "--address", socket, "--namespace", "peerpull-run", "tasks", "ls"],
                       capture_output=True, text=True, timeout=30)
    return [line for line in r.stdout.splitlines()[1:] if "RUNNING" in line]


def _running(pid: int, started: int | None = None) -> bool:
    """The process exists (with that start time) and has not exited: a zombie waiting for init to
    reap it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z" and (started is None or start_time(pid) == started)


def _shims(bundles_under: list[str]) -> list[int]:
    """containerd shims working in a task bundle under these dirs (how clean recognises them too)."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            cwd = os.readlink(entry / "cwd") if entry.name.isdigit() else ""
        except OSError:
            continue
        if "/io.containerd.runtime.v2.task/" in cwd and any(cwd.startswith(d + "/") for d in bundles_under):
            out.append(int(entry.name))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("crashed", ["run", "run-and-containerd"])
def test_an_interrupted_run_is_removed_with_its_processes_and_mounts(sleeper_image: str, tmp_path: Path,
                                                                      bystander, crashed: str) -> None:
    """SIGKILL `peerpull run` while its container runs (and its containerd too: then the shim and
    the container are found without containerd's help); clean ends all of it, and only it."""
    setup = tmp_path / "runs" / "interrupted"
    run = subprocess.Popen([sys.executable, "-m", "peerpull", "--log-level", "warning", "run", sleeper_image,
                            "--work-dir", str(setup), "--quiet"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        marker_file = setup / MARKER_NAME

        def container_running() -> bool:
            if run.poll() is not None:
                raise AssertionError(f"peerpull run exited early ({run.returncode})")
            if not marker_file.exists():
                return False
            sock = json.loads(marker_file.read_text()).get("containerd_socket", "")
            return bool(sock) and os.path.exists(sock) and bool(_running_tasks(sock))

        _wait_for(container_running, 300, "the container to run")
    finally:
        run.kill()  # as a crash would: the daemon, containerd and the container stay behind
        run.wait()
    marker = json.loads(marker_file.read_text())
    procs = {p["role"]: (p["pid"], p["start_time"]) for p in marker["processes"]}
    assert set(procs) == {"daemon", "containerd"}
    assert all(start_time(pid) == started for pid, started in procs.values()), "they should outlive the run"
    if crashed == "run-and-containerd":
        os.kill(procs["containerd"][0], signal.SIGKILL)
        _wait_for(lambda: start_time(procs["containerd"][0]) != procs["containerd"][1], 30, "containerd to die")
    dirs = [str(setup.resolve()), *marker["extra_dirs"]]
    assert mounts_under(*dirs), "the interrupted run should leave mounts (FUSE, container rootfs)"
    shims = _shims(marker["extra_dirs"])
    assert shims, "the container's shim should outlive the run"

    r = peerpull_cmd("clean", "--work-root", str(tmp_path / "runs"), timeout=180)
    assert r.returncode == 0, r.stderr
    assert "1 set-up(s) removed" in r.stdout, r.stdout
    assert not any(_running(pid, started) for pid, started in procs.values())
    assert not any(_running(pid) for pid in shims)
    assert not mounts_under(*dirs)
    assert not any(os.path.exists(d) for d in dirs) and not (tmp_path / "runs").exists()
    assert _alive(bystander)
