"""`reproduce --slurm` and `--status` against a real one-node SLURM cluster (tests/slurm_cluster.py).

A tiny table (Table 1 rows 13-14, seeds 0 and 1, on generated images, CPU, gloo) is submitted as one job
array whose tasks run under srun and torchrun as on a cluster. One task is cut by its time limit's
warning (the USR1 that `#SBATCH --signal=B:USR1@...` sends the batch shell, sent here at once), another
is preempted by `scontrol requeue` mid-epoch, and both requeued jobs are let start at once (SLURM holds
a requeued job back for two minutes). A third trains straight through; the fourth fails (its run folder
holds a file of the user's).
"""

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from powergrad_train.cli import main
from powergrad_train.reproduction import reproduce, slurm
from tests import warm
from tests.conftest import assert_same_weights, load_weights, tiny_overrides
from tests.slurm_cluster import slurm_cluster  # noqa: F401 (a fixture)

# The tests on the cluster (about half a minute, and root): `pytest -m slurm` runs them alone, `-m "not slurm"`
# the rest.
on_the_cluster = pytest.mark.slurm

# 40 steps per epoch and a checkpoint every 5: a signal lands inside the epoch.
SETTINGS = {"data.batch_size": 4, "schedule.epochs": 1, "schedule.warmup_epochs": 0, "checkpoint.every_steps": 5,
            "train.log_every_steps": 5, "data.backend": "torchvision", "data.val_backend": "same", "amp": "off",
            "channels_last": "false"}
# The array's tasks, in the table's order: row 13 seeds 0 and 1, row 14 seeds 0 and 1.
PREEMPTED, CUT, STRAIGHT, FAILING = "resnet18_baseline", "resnet18_baseline-seed1", "resnet18_pgt", \
    "resnet18_pgt-seed1"
TASKS = (PREEMPTED, CUT, STRAIGHT, FAILING)


def command(tiny_root, out, *extra) -> list[str]:
    return ["reproduce", "1", "--data", str(tiny_root), "--rows", "13,14", "--seeds", "0,1", "--out", str(out),
            "--slurm", "--gpus-per-node", "0", *tiny_overrides(tiny_root, **SETTINGS), *extra]


def cli(*args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `powergrad-train ARGS`, in this process."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def status(out) -> dict[str, str]:
    """--status: each line's state by run folder name, and the report's line."""
    code, text, err = cli("reproduce", "1", "--out", str(out), "--status")
    assert code == 0 and not err, err
    found = {}
    for line in text.splitlines():
        if match := re.fullmatch(r"Table 1 row (13|14): [^,]+, seed ([01]): (.*)", line):
            found[TASKS[2 * (int(match[1]) - 13) + int(match[2])]] = match[3]
        else:
            assert line.startswith("report: "), text
            found["report"] = line
    assert set(TASKS) <= set(found), text
    return found


def job_id(job, cluster) -> str:
    """An array task's own job id, as scontrol's listpids, update and requeue take it."""
    return cluster.run("squeue", "-h", "-j", job, "-o", "%A").stdout.strip()


def warn_of_the_time_limit(job, cluster):
    """What `#SBATCH --signal=B:USR1@...` does before a job's time limit: USR1 to its batch shell, here at once.
    (`scancel --signal=USR1 --batch` sends it too, but SLURM 22.05 answers it with an error while sibling
    tasks of the array wait, and scancel sends it again and again for a minute.)"""
    listed = cluster.run("scontrol", "listpids", job_id(job, cluster)).stdout.splitlines()[1:]
    listed = [line.split() for line in listed]
    shells = [int(fields[0]) for fields in listed if fields[2] == "batch" and
              b"slurm_script" in Path(f"/proc/{fields[0]}/cmdline").read_bytes()]
    assert len(shells) == 1, listed
    os.kill(shells[0], signal.SIGUSR1)


def queue(cluster) -> dict[str, tuple[str, str]]:
    """squeue: job -> (state, reason)."""
    lines = cluster.run("squeue", "-h", "-r", "-o", "%i %T %r").stdout.splitlines()
    return {job: (state, reason) for job, state, reason in (line.split(" ", 2) for line in lines if line.strip())}


def wait_until(what, check, cluster, timeout=300):
    """check()'s first true answer (a hang ends the test, with the daemons' logs)."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout} s; squeue: {queue(cluster)}\n{cluster.logs()}")
        time.sleep(0.05)
    return found


def requeued(job, out, cluster) -> dict[str, str]:
    """--status once the job is back in the queue, held there for the two minutes SLURM waits before a
    requeued job may start again; then it is let start. (Not in the second its node revoked the credential
    of its previous start, which refuses a start with a credential of that same second.)"""
    wait_until(f"job {job} requeued", lambda: queue(cluster).get(job, ("",))[0] == "PENDING", cluster)
    seen, ended = status(out), int(time.time())
    wait_until("the next second", lambda: int(time.time()) > ended, cluster)
    cluster.run("scontrol", "update", f"JobId={job_id(job, cluster)}", "StartTime=now")
    return seen


@contextlib.contextmanager
def partition_down(cluster):
    """While inside, the partition takes jobs but starts none."""
    partition = f"PartitionName={cluster.partition}"
    cluster.run("scontrol", "update", partition, "State=DOWN")
    try:
        yield
    finally:
        cluster.run("scontrol", "update", partition, "State=UP")


def training(run_dir, log) -> bool:
    """The run has written a checkpoint and a progress line: it is inside its first epoch."""
    return (run_dir / "last.pt").exists() and log.exists() and " step " in log.read_text(errors="replace")


def uninterrupted(run, run_dir):
    """The run as its array task starts it, outside SLURM, in `run_dir`."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.err", "w") as err:
        return warm.popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                           "powergrad_train", "--output", str(run_dir), *run.train_args],
                          stdout=subprocess.DEVNULL, stderr=err)


@pytest.fixture(scope="module")
def table(slurm_cluster, tiny_root, module_tmp):  # noqa: F811 (the fixture imported above)
    """The table submitted, submitted again, its runs cut, preempted, failed and finished, its report written,
    and what --status said on the way; beside it the cut and preempted runs trained straight through."""
    cluster, out, seen = slurm_cluster, module_tmp / "table", {}
    (out / FAILING).mkdir(parents=True)
    (out / FAILING / "notes.txt").write_text("mine\n")
    sets = [s.split("=", 1)[1] for s in tiny_overrides(tiny_root, **SETTINGS)]
    planned = {run.output.name: run for run in reproduce.plan(1, tiny_root, 1, out, sets, [13, 14], [0, 1])}
    references = {name: module_tmp / "straight" / name for name in (CUT, PREEMPTED)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "executable", warm.interpreter())  # every job's processes: real ones, started warm
        mp.setenv("PYTHON_EXEC", warm.interpreter())  # (torchrun's workers too)
        mp.setenv("OMP_NUM_THREADS", "1")  # several runs share the cores
        with partition_down(cluster):  # jobs queue, none starts
            seen["first"] = cli(*command(tiny_root, out))
            straight = [uninterrupted(planned[name], references[name]) for name in references]
            seen["queued"] = status(out)
            seen["again"] = cli(*command(tiny_root, out))
            seen["other config"] = cli(*command(tiny_root, out, "--set", "optim.lr=0.2"))
            seen["jobs"] = queue(cluster)
            seen["report job"] = (out / "slurm" / "report.job").read_text().strip()
        array = re.search(r"submitted: job array (\d+) ", seen["first"][1])[1]
        job = {name: f"{array}_{i}" for i, name in enumerate(TASKS)}
        log = {name: out / "slurm" / "logs" / f"table1-{job[name]}.log" for name in TASKS}

        wait_until("the run to cut in training", lambda: training(out / CUT, log[CUT]), cluster)
        seen["running"] = status(out)
        warn_of_the_time_limit(job[CUT], cluster)
        wait_until("the run to preempt in training", lambda: training(out / PREEMPTED, log[PREEMPTED]), cluster)
        cluster.run("scontrol", "requeue", job_id(job[PREEMPTED], cluster))
        seen["requeued"] = {CUT: requeued(job[CUT], out, cluster)[CUT],
                            PREEMPTED: requeued(job[PREEMPTED], out, cluster)[PREEMPTED]}
        wait_until("the report job's report", lambda: (out / "report" / "report.md").exists() and not queue(cluster),
                   cluster)
        seen["done"] = status(out)
        script = out / "slurm" / "table1.sbatch"
        written = script.read_text()
        script.write_text(written + "# mine\n")
        seen["edited"] = cli(*command(tiny_root, out)), sorted(p.name for p in (out / "slurm").iterdir())
        script.write_text(written)
        with partition_down(cluster):  # the failed run is submitted again, and cancelled
            seen["after"] = cli(*command(tiny_root, out))
            cluster.run("scancel", *(job_id(j, cluster) for j in queue(cluster)))
        for process, name in zip(straight, references):
            assert process.wait(timeout=300) == 0, (references[name].parent / f"{name}.err").read_text()[-3000:]
    return {"out": out, "job": job, "log": log, "array": array, "references": references, **seen}


def events(table, name) -> list[str]:
    path = table["out"] / "slurm" / "runs" / name / f"{table['job'][name]}.events"
    return [line.split()[0] for line in path.read_text().splitlines()]


@on_the_cluster
def test_one_array_task_per_row_and_seed_then_a_report_job_after_it(table):
    code, out, err = table["first"]
    assert code == 0, err
    for name in TASKS:
        assert f": submitted as job {table['job'][name]} ({table['out'] / name}, log {table['log'][name]})" in out
    assert table["jobs"] == {**{table["job"][n]: ("PENDING", "PartitionDown") for n in TASKS},
                             table["report job"]: ("PENDING", table["jobs"][table["report job"]][1])}
    assert table["jobs"][table["report job"]][1] in ("Dependency", "PartitionDown")
    script = (table["out"] / "slurm" / "table1.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --signal=B:USR1@300" in script and "#SBATCH --requeue" in script


@on_the_cluster
def test_a_second_submission_submits_nothing_and_says_why(table):
    code, out, err = table["again"]
    assert code == 0, err
    for name in TASKS:
        assert f": queued as job {table['job'][name]}, not submitted again" in out
    assert out.rstrip().endswith("nothing submitted: every run is finished, queued or running")
    code, out, err = table["after"]  # once all have ended, only the failed run is submitted again
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("Table 1 row")][-4:-1] == [
        f"Table 1 row 13: resnet18 cosine baseline, seed {s}: finished, not submitted ({table['out'] / n})"
        for s, n in ((0, PREEMPTED), (1, CUT))] + [
        f"Table 1 row 14: resnet18 cosine PGT 0.25, seed 0: finished, not submitted ({table['out'] / STRAIGHT})"]
    assert re.search(rf"Table 1 row 14: resnet18 cosine PGT 0.25, seed 1: submitted as job \d+_3 .*; again: job "
                     rf"{table['job'][FAILING]} failed: error: --output: ", out)
    assert "submitted: job array " in out


@on_the_cluster
def test_a_queued_run_with_another_config_is_refused(table):
    code, out, err = table["other config"]
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: reproduce --slurm: {table['out'] / PREEMPTED} is queued as job "
                          f"{table['job'][PREEMPTED]} with another config than this command's (optim.lr: 0.05 -> 0.2); "
                          "nothing was submitted")
    assert set(table["jobs"]) == {*table["job"].values(), table["report job"]}


@on_the_cluster
def test_status_through_every_state(table):
    since = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    for name in TASKS:
        assert re.fullmatch(rf"queued since {since} \(PartitionDown\), job {table['job'][name]}",
                            table["queued"][name]), table["queued"][name]
    assert re.fullmatch(rf"running on \S+ since {since}, job {table['job'][CUT]}: epoch 1/1 step \d+/40, \d+ images/s, "
                        r"ETA \S+( \S+)?, requeued 0 times", table["running"][CUT]), table["running"][CUT]
    for name in (CUT, PREEMPTED):
        assert re.fullmatch(rf"queued since {since}( \(BeginTime\))?, job {table['job'][name]}, requeued 1 time",
                            table["requeued"][name]), table["requeued"][name]
    for name in (CUT, PREEMPTED, STRAIGHT):
        assert re.fullmatch(r"finished: final test top-1 \d+\.\d\d, best \d+\.\d\d \(epoch 1\)", table["done"][name])
    assert re.fullmatch(r"failed \(exit status \d+\), job " + re.escape(
        f"{table['job'][FAILING]}: error: --output: {table['out'] / FAILING} is not empty and is not a powergrad-train "
        f"run folder; choose a new or empty folder; log {table['log'][FAILING]}"), table["done"][FAILING])
    assert re.fullmatch(rf"report: job {table['report job']} waits \((Dependency|PartitionDown)\); it writes "
                        + re.escape(str(table["out"] / "report" / "report.md")), table["queued"]["report"])
    assert table["done"]["report"].startswith(f"report: {table['out'] / 'report' / 'report.md'} (written ")


@on_the_cluster
def test_cut_and_preempted_runs_resume_and_end_as_an_uninterrupted_run(table):
    assert events(table, CUT) == ["start", "requeued", "start", "finished"]
    assert events(table, PREEMPTED) == ["start", "stopped", "start", "finished"]
    for name in (CUT, PREEMPTED):
        assert "stopped by SIGTERM in epoch 1 after step" in table["log"][name].read_text()
        assert_same_weights(load_weights(table["references"][name] / "last.pt"),
                            load_weights(table["out"] / name / "last.pt"))
    assert events(table, STRAIGHT) == ["start", "finished"]


@on_the_cluster
def test_a_failing_run_is_recorded_failed_not_requeued(table):
    assert events(table, FAILING) == ["start", "failed"]
    assert (table["out"] / FAILING / "notes.txt").read_text() == "mine\n"  # (its folder untouched)


@on_the_cluster
def test_the_report_is_written_by_the_job_after_the_array(table):
    log = (table["out"] / "slurm" / "logs" / f"report-{table['report job']}.log").read_text()
    assert f"written: {table['out'] / 'report' / 'report.md'}" in log
    text = (table["out"] / "report" / "report.md").read_text()
    assert f"| {CUT}, {PREEMPTED} |" in text and f"| {STRAIGHT} |" in text  # (an arm: its runs, over the seeds)
    assert FAILING not in text
    ended = max((table["out"] / "slurm" / "runs" / n / f"{table['job'][n]}.events").stat().st_mtime for n in TASKS)
    assert (table["out"] / "report" / "report.md").stat().st_mtime >= ended


@on_the_cluster
def test_a_script_edited_by_hand_is_not_overwritten(table):
    (code, out, err), files = table["edited"]
    assert code == 2 and err == (f"error: reproduce --slurm: {table['out'] / 'slurm' / 'table1.sbatch'} was edited "
                                 "since it was written; nothing was submitted: submit it yourself with sbatch, or move "
                                 "it away to have it written anew (--sbatch and --setup add lines to it)\n")
    assert files == sorted([".lock", ".table1.sbatch.sha256", "logs", "report.job", "runs", "table1.sbatch"])


# ---- without a cluster -----------------------------------------------------------------------------------

def test_the_dry_run_prints_the_array_script_and_writes_nothing(tmp_path, capsys):
    main(["reproduce", "1", "--data", str(tmp_path / "imagenet"), "--rows", "13,14", "--seeds", "0,1", "--out",
          str(tmp_path / "out"), "--slurm", "--nodes", "2", "--gpus-per-node", "4", "--time", "4:00:00",
          "--partition", "gpu", "--account", "lab", "--qos", "high", "--sbatch=--cpus-per-task=32",
          "--setup", "module load cuda", "--dry-run"])
    out = capsys.readouterr().out
    script = out[out.index("#!/bin/bash\n"):]
    lines = script.splitlines()
    for line in ("#SBATCH --array=0-3", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=4:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --cpus-per-task=32",
                 f"#SBATCH --output={tmp_path / 'out' / 'slurm' / 'logs' / 'table1-%A_%a.log'}"):
        assert line in lines, line
    assert lines.index("module load cuda") < lines.index("set -uo pipefail")  # (before -u: activation scripts)
    assert "  3) RUN=resnet18_pgt-seed1  # Table 1 row 14: resnet18 cosine PGT 0.25, seed 1" in lines
    assert f"     ARGS=(--config resnet18_pgt.yaml --set data.root={tmp_path / 'imagenet'} --set seed=1) ;;" in lines
    assert '  "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node=4 \\' in lines
    assert '  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" \\' in lines
    assert '  -m powergrad_train --output "$OUT/$RUN" --resume auto "${ARGS[@]}" &' in lines
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--partition", "gpu"], "reproduce --partition: an option of a SLURM submission; add --slurm to submit the "
                             "table as a job array"),
    (["--slurm", "--time", "0:05:00"], "reproduce --time '0:05:00': a job is told to stop 300 s before its time limit "
                                       "(to write its checkpoint), so give at least 10 minutes"),
    (["--slurm", "--time", "4h"], "reproduce --time '4h': not a SLURM time limit (e.g. 4:00:00, or 1-00:00:00 for "
                                  "a day)"),
    (["--slurm", "--sbatch=cpus-per-task=4"], "reproduce --sbatch 'cpus-per-task=4': give one sbatch option, e.g. "
                                              "--sbatch=--cpus-per-task=32"),
    (["--slurm", "--setup", "module load cuda\nrm -rf /"], "reproduce --setup 'module load cuda\\nrm -rf /': give one "
                                                          "line of shell"),
    (["--slurm", "--partition", "gpu a100"], "reproduce --partition 'gpu a100': not a SLURM partition name"),
    (["--status", "--slurm"], "reproduce --status: it only reads where the runs in --out stand; give it without "
                              "--slurm"),
])
def test_slurm_option_mistakes_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        main(["reproduce", "1", "--data", str(tmp_path), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_submission_without_sbatch_is_refused_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no SLURM here
    with pytest.raises(SystemExit) as stop:
        main(["reproduce", "1", "--data", str(tmp_path), "--rows", "14", "--out", str(tmp_path / "out"), "--slurm"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: reproduce --slurm: sbatch not found (run this on a SLURM login node, "
                                       "where sbatch is on the PATH)\n")
    assert not (tmp_path / "out").exists()


def test_status_without_a_scheduler_still_reads_what_the_tasks_recorded(tmp_path, capsys, monkeypatch):
    """Where squeue cannot be asked (OUT copied elsewhere), the runs' records still say what ended how; a task
    of the script submitted by hand (no `submitted` line) is known by what it recorded once it started."""
    out = tmp_path / "out"
    runs = (("resnet18_baseline", "7_0", ["start 2025-01-02T03:04:05+00:00 0 node1"]),
            ("resnet18_pgt", "7_1", ["start 2025-01-02T03:04:05+00:00 0 node2", "failed 2025-01-02T03:05:00+00:00 2"]),
            ("resnet18_baseline-seed1", "9_1", ["start 2025-01-03T00:00:00+00:00 0 node1",
                                                "failed 2025-01-03T00:01:00+00:00 1"]))
    (out / "slurm" / "logs").mkdir(parents=True)
    for name, job, events in runs:
        (out / "slurm" / "runs" / name).mkdir(parents=True)
        log = out / "slurm" / "logs" / f"table1-{job}.log"
        log.write_text(f"model: resnet18\nerror: data.root: /data/{job}: no such folder\nsrun: error: task 0\n")
        if job != "9_1":
            (out / "slurm" / "runs" / name / "submitted").write_text(f"{job} 2025-01-02T03:00:00+00:00 {log}\n")
        (out / "slurm" / "runs" / name / f"{job}.events").write_text("\n".join(events) + "\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    main(["reproduce", "1", "--out", str(out), "--status"])
    logs = out / "slurm" / "logs"
    assert capsys.readouterr().out.splitlines() == [
        "Table 1 row 13: resnet18 cosine baseline, seed 0: submitted as job 7_0, 0 epochs; queued or running? "
        "(reproduce --status: squeue not found (run this on a SLURM login node, where squeue is on the PATH))",
        "Table 1 row 13: resnet18 cosine baseline, seed 1: failed (exit status 1), job 9_1: error: data.root: "
        f"/data/9_1: no such folder; log {logs / 'table1-9_1.log'}",
        "Table 1 row 14: resnet18 cosine PGT 0.25, seed 0: failed (exit status 2), job 7_1: error: data.root: "
        f"/data/7_1: no such folder; log {logs / 'table1-7_1.log'}"]
