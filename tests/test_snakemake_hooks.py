"""Where Snakemake's own messages mislead (rules/hooks.smk): a stage's error reaches the
terminal past a full disk; a live lock is told apart from a stale one; a run stopped by
SIGTERM is not called a failed job. Tiny workflows in a tmp folder, real Snakemake."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemvlab.config import REPO_ROOT
from gemvlab.error_line import SHELL_PREFIX

PY = shlex.quote(sys.executable)


def in_a_job_shell(command: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``command`` run the way a rule's shell runs it (Snakemake's stderr stays ours)."""
    return subprocess.run(["bash", "-c", SHELL_PREFIX + command], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("args", "code", "says"), [
    ("seed=abc", 2, "gemvlab fetch_data: error: seed=abc: expected an integer"),
    ("data.name=nope", 1, "gemvlab fetch_data: error: dataset 'nope' has no builder"),
])
def test_a_stage_error_reaches_the_caller_past_a_full_disk(tmp_path, args, code, says):
    """/dev/full as the job log: the stage's one line still shows, once; so does it, once,
    where the log is the caller's stderr itself."""
    stage = f"{PY} -m gemvlab.stages.fetch_data {args} logger=none paths.results={tmp_path}"
    for log in ("> /dev/full 2>&1", ""):
        proc = in_a_job_shell(f"{stage} {log}", tmp_path)
        assert proc.returncode == code, proc.stderr[-2000:]
        assert proc.stderr.count(says) == 1, proc.stderr[-2000:]


def test_a_stage_crash_names_itself_to_the_caller_past_a_full_disk(tmp_path):
    """A bug, not a GemvlabError: its traceback is lost with the log, but one line shows."""
    script = tmp_path / "crash.py"
    script.write_text(f"""import sys
from gemvlab.stage import stage
sys.argv = ["crash", "logger=none", "paths.results={tmp_path}"]
stage("crash")(lambda cfg, ctx: 1 / 0)()
""")
    proc = in_a_job_shell(f"{PY} {script} > /dev/full 2>&1", tmp_path)
    assert proc.returncode != 0
    assert "gemvlab crash: failed: ZeroDivisionError: division by zero" in proc.stderr


WAITING_WORKFLOW = f"""include: "{REPO_ROOT / 'rules' / 'hooks.smk'}"

rule all:
    input: "done"

rule wait:
    output: "done"
    shell: "touch started; while [ ! -e go ]; do sleep 0.1; done; touch {{output}}"
"""


def snakemake(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-c1", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def wait_for(done, what: str) -> None:
    deadline = time.monotonic() + 120
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done(), f"never: {what}"


def test_locks_and_sigterm_are_told_as_they_are(tmp_path):
    (tmp_path / "Snakefile").write_text(WAITING_WORKFLOW)
    log = tmp_path / "first.err"
    with log.open("w") as err:
        first = subprocess.Popen([sys.executable, "-m", "snakemake", "-c1"], cwd=tmp_path,
                                 stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for((tmp_path / "started").exists, "the job started")
        # A second run meets the first one's lock: not --unlock, which Snakemake advises.
        second = snakemake(tmp_path)
        assert second.returncode != 0 and "LockException" in second.stderr
        assert (f"gemvlab: snakemake (pid {first.pid}) is running in this folder and holds its "
                "lock") in second.stderr
        assert "do not run `snakemake --unlock` meanwhile" in second.stderr
        # SIGTERM: Snakemake lets the running job finish, then says a job did not complete.
        first.send_signal(signal.SIGTERM)
        wait_for(lambda: "Will exit after finishing" in log.read_text(), "SIGTERM noticed")
        (tmp_path / "go").touch()
        first.wait(timeout=120)
    finally:
        first.kill()
    said = log.read_text()
    assert first.returncode != 0 and "did not complete successfully" in said
    assert "gemvlab: this run was stopped by SIGTERM, not by a failing job" in said
    # A lock that no live run holds: --unlock is the fix, and the line says so.
    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "0.output.lock").write_text(f"{tmp_path / 'done'}\n")
    stale = snakemake(tmp_path, "-n")
    assert "gemvlab: .snakemake/locks/ holds a stale lock" in stale.stderr


def test_a_failed_job_is_not_called_a_signal(tmp_path):
    (tmp_path / "Snakefile").write_text(WAITING_WORKFLOW.replace("touch started;", "exit 3;"))
    proc = snakemake(tmp_path)
    assert proc.returncode != 0 and "Error in rule wait" in proc.stderr
    assert "gemvlab:" not in proc.stderr
