"""job_script.sh, run by hand and submitted with a real sbatch to a single-node SLURM
cluster that this module brings up on the machine (tests/slurm/cluster.sh).

    make test-slurm                        # only these tests
    .venv/bin/python -m pytest tests/test_slurm.py -m slurm -v

The cluster needs root (the daemons run as plain processes, no systemd) and Debian's
slurm-wlm and munge packages, installed by cluster.sh with apt-get when missing. Where
the machine cannot run SLURM the cluster tests skip with the reason, unless
DATAGEN_REQUIRE_SLURM=1 turns that into a failure (DATAGEN_SLURM_KEEP=1 keeps the
cluster's folder, with its logs, after the daemons are stopped). The model is a tiny
random one built on the spot (datagen.tinymodel); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.util import ROOT, read_jsonl, run_script, write_jsonl

JOB_SCRIPT = ROOT / "job_script.sh"
CLUSTER_SH = ROOT / "tests" / "slurm" / "cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE", "OUT_OF_MEMORY"}
WAIT_LIMIT = 600  # seconds: a safety net against a hung queue (a loaded machine included), not a timing assertion
# Resources a test job asks for, overriding the script's #SBATCH lines (the GPU line stays:
# the test node has fake `gpu` gres backed by placeholder devices).
SMALL_JOB = ["--cpus-per-task=1", "--mem=1500M", "--time=00:10:00"]


# --- the cluster -----------------------------------------------------------------------


@dataclass
class Cluster:
    state: Path
    env: dict  # SLURM_CONF and the ports: what sbatch/squeue/scontrol need

    def run(self, *args: str, env: dict | None = None, cwd=None) -> str:
        proc = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd,
                              env={**os.environ, **self.env, **(env or {})})
        assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr}"
        return proc.stdout

    def task_states(self, job_id: str) -> dict[int, str]:
        """{array task id: state} of an array job (one line per task, finished ones included)."""
        out = self.run("squeue", "-h", "-r", "-j", job_id, "-t", "all", "-o", "%K %T")
        states = {}
        for line in out.splitlines():
            task, state = line.split()
            states[int(task)] = state
        return states

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.state / "log").glob("slurm*.log")))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _daemon_pids(state: Path) -> dict[str, int]:
    files = {"munged": state / "munge" / "munged.pid", "slurmctld": state / "run" / "slurmctld.pid",
             "slurmd": state / "run" / "slurmd.pid"}
    return {name: int(f.read_text()) for name, f in files.items() if f.exists()}


def _running(pid: int, name: str | None = None) -> bool:
    """True while the process exists, is not a zombie (and runs the program ``name``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if name is not None and not stat.startswith(f"{pid} ({name}) "):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="session")
def slurm_cluster():
    """Bring the cluster up once for the session; tear it down and check no daemon is left."""
    # The munge user must reach its socket, so the state lives directly under /tmp
    # (pytest's tmp folders are private to root).
    state = Path(tempfile.mkdtemp(prefix="datagen-slurm-"))
    ctld_port, slurmd_port = _free_ports(2)
    env = {"SLURM_CONF": str(state / "etc" / "slurm.conf"), "SLURM_CTLD_PORT": str(ctld_port),
           "SLURM_D_PORT": str(slurmd_port)}
    started = time.monotonic()
    up = subprocess.run(["bash", str(CLUSTER_SH), "up", str(state)], capture_output=True, text=True,
                        env={**os.environ, **env}, timeout=300)
    if up.returncode == 3:
        shutil.rmtree(state, ignore_errors=True)
        reason = up.stderr.strip().splitlines()[-1]
        if os.environ.get("DATAGEN_REQUIRE_SLURM") == "1":
            pytest.fail(f"DATAGEN_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    cluster = Cluster(state, env)
    try:
        assert up.returncode == 0, f"cluster.sh up failed:\n{up.stderr}\n{cluster.logs()}"
        print(f"\nSLURM cluster up in {time.monotonic() - started:.1f} s ({state})")
        pids = _daemon_pids(state)
        assert set(pids) == {"munged", "slurmctld", "slurmd"}
        yield cluster
    finally:
        pids = _daemon_pids(state)
        down = subprocess.run(["bash", str(CLUSTER_SH), "down", str(state)], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=120)
        left = {name: pid for name, pid in pids.items() if _running(pid, name)}
        if down.returncode == 0 and not left and os.environ.get("DATAGEN_SLURM_KEEP") != "1":
            shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0, f"cluster.sh down failed: {down.stderr}"
    assert not left, f"daemons still running after cluster.sh down: {left} (state kept in {state})"


# --- inputs ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Llama-style base model and a LoRA adapter for it, built on the spot."""
    from datagen.tinymodel import build_tiny_adapter, build_tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    base = build_tiny_model(folder / "base", seed=0)
    return base, build_tiny_adapter(base, folder / "adapter", seed=1)


def write_prompts(path: Path, count: int) -> list[str]:
    ids = [f"q{i:04d}" for i in range(count)]
    write_jsonl(path, [{"id": i, "prompt": f"Question {n}: what is the capital of country {n}?"}
                       for n, i in enumerate(ids)])
    return ids


def job_env(tiny_model, **settings) -> dict:
    """Settings for job_script.sh, passed the way a user would: the submitting environment."""
    base, adapter = tiny_model
    return {"PYTHON": sys.executable, "MODEL_NAME_OR_PATH": str(base), "ADAPTER_PATH": str(adapter),
            "INPUT_FILE": "prompts.jsonl", "ID_FIELD": "id", "OUTPUT_FILE": "generations.jsonl",
            "OMP_NUM_THREADS": "1", **settings}


def sbatch(cluster: Cluster, *args: str, env: dict, script_args: tuple[str, ...] = ()) -> str:
    """Submit job_script.sh with the sbatch options ``args`` and its own ``script_args``."""
    Path("logs").mkdir(exist_ok=True)  # sbatch opens logs/... before the script runs
    job_id = cluster.run("sbatch", "--parsable", *SMALL_JOB, *args, str(JOB_SCRIPT), *script_args,
                         env=env).strip()
    assert job_id.isdigit(), job_id
    return job_id


def wait_until(condition, what: str, cluster: Cluster):
    deadline = time.monotonic() + WAIT_LIMIT
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"== {p}\n{p.read_text()[-2000:]}" for p in sorted(Path("logs").glob("*")))
            pytest.fail(f"gave up after {WAIT_LIMIT} s waiting for {what}\n{logs}\n{cluster.logs()}")
        time.sleep(0.2)


def wait_for_array(cluster: Cluster, job_id: str, tasks: int) -> dict[int, str]:
    def finished():
        states = cluster.task_states(job_id)
        return states if len(states) == tasks and set(states.values()) <= TERMINAL else None
    return wait_until(finished, f"array job {job_id} to finish", cluster)


def line_count(path: Path) -> int:
    return sum(1 for line in open(path, "rb") if line.endswith(b"\n")) if path.exists() else 0


def shard_file(k: int, n: int) -> Path:
    return Path(f"generations.shard-{k:03d}-of-{n:03d}.jsonl")


def assert_every_request_once(ids: list[str], num_shards: int):
    seen = Counter()
    for k in range(num_shards):
        records = read_jsonl(shard_file(k, num_shards))
        assert records, f"shard {k} wrote nothing"
        assert all(r["generated_text"] is not None and r["finish_reason"] for r in records)
        seen.update(r["custom_id"] for r in records)
    assert sorted(seen) == sorted(ids), "the shards together do not hold every request"
    assert [i for i, c in seen.items() if c > 1] == [], "some requests were written twice"


def runs_in_log(log: str) -> list[str]:
    """The start line job_script.sh echoes, once per run of the task."""
    return [line for line in log.splitlines() if line.startswith("[job_script] job ")]


# --- without a cluster -----------------------------------------------------------------


@pytest.mark.parametrize("env, args, missing", [
    ({}, [], "MODEL_NAME_OR_PATH INPUT_FILE"),
    ({"MODEL_NAME_OR_PATH": "base"}, [], "INPUT_FILE"),
    ({"INPUT_FILE": "prompts.jsonl"}, ["--batch_size", "4"], "MODEL_NAME_OR_PATH"),
    ({}, ["--model_name_or_path=base"], "INPUT_FILE"),
])
def test_missing_required_settings_exit_2_with_usage(env, args, missing):
    proc = subprocess.run(["bash", str(JOB_SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert proc.returncode == 2
    assert f"job_script.sh: error: missing required setting(s): {missing} " in proc.stderr
    assert "usage: [SETTING=VALUE ...] sbatch" in proc.stderr
    assert proc.stdout == ""


def test_bad_switch_value_is_a_usage_error():
    proc = subprocess.run(["bash", str(JOB_SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MODEL_NAME_OR_PATH": "m", "INPUT_FILE": "i", "DO_SAMPLE": "maybe"})
    assert proc.returncode == 2
    assert "DO_SAMPLE='maybe' is not a switch value (use 1 or 0)" in proc.stderr


@pytest.mark.parametrize("value", ["x", "-1", "2.5", " 3"])
def test_bad_max_requeues_is_a_usage_error(value):
    proc = subprocess.run(["bash", str(JOB_SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MODEL_NAME_OR_PATH": "m", "INPUT_FILE": "i",
                               "DATAGEN_MAX_REQUEUES": value})
    assert proc.returncode == 2
    assert f"job_script.sh: error: DATAGEN_MAX_REQUEUES='{value}' is not a number of requeues" in proc.stderr
    assert proc.stdout == ""


def test_arguments_reach_the_generator_byte_for_byte(tmp_path):
    """Every argument after the script name reaches generate_data_finetuned.py as the same
    bytes: no word splitting, no globbing, no option parsing of the script's own (a stop
    string that starts with '-', in both spellings). PYTHON is a wrapper that records the
    real argv of the generator's process and then runs it (it fails fast on the missing input)."""
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text("#!/bin/sh\n"
                       'case $1 in */generate_data_finetuned.py) printf "%s\\0" "$@" > argv.nul ;; esac\n'
                       f'exec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    args = [b"--stop=---", b"--stop", b"---", b"--stop", b"two  words", b"--stop", b" *", b"--stop", b"$HOME `x` $(y)",
            b"--stop", b"a'b\"c\\d", b"--stop", b"tab\there\nnewline", b"--stop", b"", b"--stop", b"\xff\xfe",
            b"--stop", b"-", b"--stop", b"--"]
    proc = subprocess.run([b"bash", os.fsencode(JOB_SCRIPT), *args], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHON": str(wrapper), "MODEL_NAME_OR_PATH": "m",
                               "INPUT_FILE": "missing.jsonl"})
    assert b"[job_script] generator started" in proc.stdout, proc.stderr
    assert Path("argv.nul").read_bytes().split(b"\0")[:-1] == [
        os.fsencode(ROOT / "generate_data_finetuned.py"), b"--model_name_or_path", b"m",
        b"--input_file", b"missing.jsonl", *args]
    assert proc.returncode != 0  # the generator's own error: the input is missing
    assert sorted(os.listdir(tmp_path)) == ["argv.nul", "python-wrapper"]


def test_outside_slurm_forwards_only_what_is_given(tiny_model):
    """`bash job_script.sh` runs the same command without SLURM: the settings from the
    environment, then the arguments verbatim, and no default of its own."""
    ids = write_prompts(Path("prompts.jsonl"), 6)
    env = job_env(tiny_model, BATCH_SIZE="4", DO_SAMPLE="0", NO_MERGE_LORA="1", OUTPUT_FILE="")
    proc = subprocess.run(["bash", str(JOB_SCRIPT), "--max_new_tokens", "5", "--stop", "two words"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    base, adapter = tiny_model
    command = [line for line in proc.stdout.splitlines() if line.startswith("[job_script] command: ")]
    assert len(command) == 1
    assert shlex.split(command[0].removeprefix("[job_script] command: ")) == [
        sys.executable, str(ROOT / "generate_data_finetuned.py"),
        "--model_name_or_path", str(base), "--adapter_path", str(adapter), "--input_file", "prompts.jsonl",
        "--id_field", "id", "--batch_size", "4", "--no_do_sample", "--no_merge_lora",
        "--max_new_tokens", "5", "--stop", "two words"]
    assert "[job_script] job none (not under SLURM), array job none, array task none of none" in proc.stdout
    assert "[job_script]   BATCH_SIZE=4" in proc.stdout
    assert "TEMPERATURE" not in proc.stdout  # the header lists only the settings that are set
    assert "[job_script] output: generations.jsonl (0 records at start);" in proc.stdout
    assert "exited with status 0" in proc.stdout
    records = read_jsonl("generations.jsonl")  # the Python script's own default output name
    assert sorted(r["custom_id"] for r in records) == ids
    assert all(r["completion_tokens"] <= 5 for r in records)


def test_sigterm_reaches_the_generator_and_a_rerun_resumes(tiny_model):
    """SIGTERM to the job shell alone (as `scancel --batch` sends it) stops the generator
    too; the same command run again finishes the file without duplicates."""
    ids = write_prompts(Path("prompts.jsonl"), 60)
    env = {**os.environ, **job_env(tiny_model, BATCH_SIZE="1", MAX_NEW_TOKENS="32")}
    job = subprocess.Popen(["bash", str(JOB_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=env)
    try:
        child = None
        for line in job.stdout:
            if line.startswith("[job_script] generator started (pid "):
                child = int(line.split("(pid ")[1].rstrip(")\n"))
                break
        assert child is not None
        deadline = time.monotonic() + WAIT_LIMIT
        while line_count(Path("generations.jsonl")) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        job.send_signal(15)
        rest = job.stdout.read()
        assert job.wait(timeout=60) == 143
    finally:
        if job.poll() is None:
            job.kill()
    assert "[job_script] SIGTERM: stopping generation" in rest
    assert not _running(child), "the generator outlived the job shell"
    first_run = line_count(Path("generations.jsonl"))
    assert 0 < first_run < len(ids), "the first run was not stopped mid-way: give it more work"

    rerun = subprocess.run(["bash", str(JOB_SCRIPT)], capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr
    records = read_jsonl("generations.jsonl")
    assert sorted(r["custom_id"] for r in records) == ids  # each exactly once
    assert f"{len(ids) - first_run} generated, {first_run} already there" in rerun.stdout
    assert f"[job_script] output: generations.jsonl ({first_run} records at start);" in rerun.stdout


def test_venv_is_activated_when_given(tiny_model):
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests are not running in a virtual environment to hand to VENV")
    write_prompts(Path("prompts.jsonl"), 2)
    env = {k: v for k, v in job_env(tiny_model, VENV=sys.prefix, MAX_NEW_TOKENS="2").items() if k != "PYTHON"}
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    environ["PATH"] = os.pathsep.join(p for p in environ["PATH"].split(os.pathsep)
                                      if not p.startswith(sys.prefix))
    proc = subprocess.run(["bash", str(JOB_SCRIPT)], capture_output=True, text=True, timeout=300,
                          env={**environ, **env})
    assert proc.returncode == 0, proc.stderr
    assert f"[job_script] python: {sys.prefix}/bin/python3 " in proc.stdout
    assert len(read_jsonl("generations.jsonl")) == 2


def test_the_projects_venv_is_found_without_venv_or_python(tiny_model, tmp_path):
    """Outside SLURM with neither VENV nor PYTHON set, the project's .venv is used (not a
    system python3 without torch); a Python that cannot import the engine is one line."""
    project_python = ROOT / ".venv" / "bin" / "python"
    if not project_python.exists():
        pytest.skip("no .venv in the project (make test creates it)")
    write_prompts(Path("prompts.jsonl"), 2)
    env = {k: v for k, v in job_env(tiny_model, MAX_NEW_TOKENS="2").items() if k != "PYTHON"}
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "VENV")}
    proc = subprocess.run(["bash", str(JOB_SCRIPT)], capture_output=True, text=True, timeout=300,
                          env={**environ, **env})
    assert proc.returncode == 0, proc.stderr
    assert f"[job_script] python: {project_python} " in proc.stdout
    assert len(read_jsonl("generations.jsonl")) == 2
    bare = tmp_path / "bare"  # a virtual environment without torch, transformers or peft
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    proc = subprocess.run(["bash", str(JOB_SCRIPT)], capture_output=True, text=True, timeout=300,
                          env={**environ, **env, "PYTHON": str(bare / "bin" / "python")})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"job_script.sh: error: {bare}/bin/python cannot import torch transformers peft; run make venv in {ROOT}, "
        "or set VENV=DIR or PYTHON=INTERPRETER to an environment with requirements.txt installed"]


# --- with a real sbatch ------------------------------------------------------------------


def test_every_flag_of_the_generator_is_a_setting_of_the_job_script():
    """The environment settings of job_script.sh cover every flag of generate_data_finetuned.py
    (value flags in SETTINGS, switches in SWITCHES), so a new flag cannot be forgotten."""
    from datagen.finetuned import generate_data_finetuned

    script = JOB_SCRIPT.read_text()
    settings = re.search(r"^SETTINGS=\((.*?)\)", script, re.S | re.M).group(1).split()
    switches = re.search(r"^SWITCHES=\((.*?)\)", script, re.S | re.M).group(1).split()
    switch_flags = set(re.findall(r"\]=(--[a-z_-]+)", script))
    for action in generate_data_finetuned.build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:
            assert flag in switch_flags or flag[2:].upper() in switches, f"{flag} has no switch in job_script.sh"
        else:
            assert flag[2:].upper() in settings, f"{flag} has no setting in job_script.sh"


@pytest.mark.slurm
def test_array_job_shards_every_request_exactly_once(slurm_cluster, tiny_model):
    """Three tasks write three shards; the stop strings given after the script name (two
    starting with '-', as --stop=--- and --stop -x-, one with two spaces) reach every task's
    generator unchanged."""
    ids = write_prompts(Path("prompts.jsonl"), 30)
    started = time.monotonic()
    stops = ["---", "two  words", "-x-"]
    job_id = sbatch(slurm_cluster, "--array=0-2", env=job_env(tiny_model, BATCH_SIZE="4", MAX_NEW_TOKENS="8"),
                    script_args=(f"--stop={stops[0]}", "--stop", stops[1], "--stop", "-x-"))
    states = wait_for_array(slurm_cluster, job_id, 3)
    print(f"\n3-task array job ran in {time.monotonic() - started:.1f} s")
    assert states == {0: "COMPLETED", 1: "COMPLETED", 2: "COMPLETED"}
    assert_every_request_once(ids, 3)
    for k in range(3):
        assert {tuple(r["generation"]["stop"]) for r in read_jsonl(shard_file(k, 3))} == {tuple(stops)}
    assert not Path("generations.jsonl").exists()  # each task wrote only its shard
    for k in range(3):
        log = Path(f"logs/datagen-{job_id}_{k}.out").read_text()  # --output=logs/%x-%A_%a.out
        runs = runs_in_log(log)
        assert len(runs) == 1 and f"array job {job_id}, array task {k} of 3, restart 0," in runs[0], runs
        assert f"[job_script]   MODEL_NAME_OR_PATH={tiny_model[0]}" in log
        assert f"[job_script] output: {shard_file(k, 3)} (0 records at start);" in log
        assert "[job_script]   BATCH_SIZE=4" in log
        assert f"[job_script] python: {sys.executable} " in log
        assert f"wrote {shard_file(k, 3)}: 10 generated, 0 already there" in log
        assert "[job_script] generate_data_finetuned.py exited with status 0" in log

    # The shards merge into one file, as docs/slurm.md says.
    merged = run_script("reformat_results.py", "--input_file", "generations.shard-*.jsonl",
                        "--output_file", "reformatted.jsonl")
    assert merged.returncode == 0, merged.stderr
    assert sorted(r["id"] for r in read_jsonl("reformatted.jsonl")) == ids


@pytest.mark.slurm
def test_interrupted_tasks_resume_without_loss_or_duplicates(slurm_cluster, tiny_model):
    """Task 1 gets USR1 (what --signal=B:USR1@N sends before the time limit) and requeues
    itself; task 0 is requeued from outside mid-run (as on preemption or node trouble).
    Both reruns carry on where they stopped."""
    per_shard = 160
    ids = write_prompts(Path("prompts.jsonl"), 2 * per_shard)
    job_id = sbatch(slurm_cluster, "--array=0-1",
                    env=job_env(tiny_model, BATCH_SIZE="1", MAX_NEW_TOKENS="32"))
    task = {k: f"{job_id}_{k}" for k in range(2)}

    def state(k):
        return slurm_cluster.task_states(job_id).get(k)

    # Both tasks mid-run: task 1 gets USR1 in its batch shell, which stops the generator
    # and requeues the task; task 0 is requeued from outside (SLURM stops it with SIGTERM).
    # Each task is interrupted as soon as its own first record is written: on a busy machine
    # one task can start long after the other, so waiting for both could let one finish.
    written = {}
    for k, interrupt in ((1, ("scancel", "--batch", "--signal=USR1", task[1])),
                         (0, ("scontrol", "requeue", task[0]))):
        wait_until(lambda: line_count(shard_file(k, 2)) > 0, f"task {k} to write its first records", slurm_cluster)
        slurm_cluster.run(*interrupt)
        written[k] = line_count(shard_file(k, 2))
    assert all(n < per_shard for n in written.values()), \
        f"a task finished before it could be interrupted ({written} of {per_shard}): give it more work"
    wait_until(lambda: state(0) == "PENDING" and state(1) == "PENDING", "both tasks to be requeued",
               slurm_cluster)

    # Both start again by themselves (after cred_expire, 10 s on the test cluster).
    states = wait_for_array(slurm_cluster, job_id, 2)
    assert states == {0: "COMPLETED", 1: "COMPLETED"}
    assert_every_request_once(ids, 2)

    logs = {k: Path(f"logs/datagen-{job_id}_{k}.out").read_text() for k in (0, 1)}  # --open-mode=append
    for k in (0, 1):
        runs = runs_in_log(logs[k])
        assert len(runs) == 2 and "restart 0," in runs[0] and "restart 1," in runs[1], runs
        # The rerun resumed: it skipped what the first run had written.
        final = [line for line in logs[k].splitlines() if line.startswith(f"wrote {shard_file(k, 2)}:")]
        assert len(final) == 1, logs[k]
        skipped = int(final[0].split(" generated, ")[1].split(" already there")[0])
        assert 0 < skipped < per_shard
    # Task 1 requeued itself by its own name: `scontrol requeue JOBID` with the id it shares
    # with the whole array would have requeued task 0 as well (which then fails or reruns).
    assert f"requeueing job {task[1]} to carry on" in logs[1]
    assert "failed" not in logs[1]
    assert "USR1" in logs[1]
    assert "DUE TO JOB REQUEUE" in logs[0]


def run_time_s(cluster: Cluster, job_id: str) -> int:
    """How long the job's current run has been running, from `scontrol show job`."""
    found = re.search(r"RunTime=(?:(\d+)-)?(\d+):(\d+):(\d+)", cluster.run("scontrol", "show", "job", job_id))
    days, hours, minutes, seconds = (int(x or 0) for x in found.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


@pytest.mark.slurm
def test_time_limit_signal_requeues_the_job_and_the_rerun_resumes(slurm_cluster, tiny_model):
    """The real path of the #SBATCH lines: SLURM itself sends USR1 to the batch shell when the
    time limit is near (--signal=B:USR1@300); the script stops the generator, requeues its
    own job, and the rerun resumes the same file. Nothing here assumes a speed: the limit is
    cut to a few minutes only once the first record is written (so USR1 comes within
    SLURM's next check), and given back once the job is requeued; the work is far too much
    to finish, so the test stops the job itself once the rerun writes."""
    ids = write_prompts(Path("prompts.jsonl"), 5000)
    job_id = sbatch(slurm_cluster, "--time=30", env=job_env(tiny_model, BATCH_SIZE="1", MAX_NEW_TOKENS="32"))
    log = Path(f"logs/datagen-{job_id}_4294967294.out")  # %a outside an array
    output = Path("generations.jsonl")

    def text():
        return log.read_text() if log.exists() else ""

    def state():
        return slurm_cluster.run("squeue", "-h", "-j", job_id, "-t", "all", "-o", "%T").strip()

    wait_until(lambda: line_count(output) > 0, "the first record", slurm_cluster)
    # Under 300 s left: inside the warning window, so SLURM sends USR1 at its next check.
    minutes = run_time_s(slurm_cluster, job_id) // 60 + 4
    slurm_cluster.run("scontrol", "update", f"jobid={job_id}", f"TimeLimit={minutes}")
    wait_until(lambda: state() == "PENDING" and f"requeueing job {job_id} to carry on" in text(),
               "USR1 from SLURM before the time limit and a requeue", slurm_cluster)
    requeued_with = line_count(output)
    # The rerun gets the time back (else its own warning would come at once).
    slurm_cluster.run("scontrol", "update", f"jobid={job_id}", "TimeLimit=30")
    # The rerun starts by itself and writes more; starting over would repeat ids.
    wait_until(lambda: line_count(output) > requeued_with, "the rerun to write", slurm_cluster)
    slurm_cluster.run("scancel", job_id)
    wait_until(lambda: state() in TERMINAL, "the job to end", slurm_cluster)

    runs = runs_in_log(text())
    assert len(runs) >= 2 and "restart 0," in runs[0] and "restart 1," in runs[1], runs
    first_run = text().split(runs[1])[0]
    assert "USR1 at " in first_run
    assert re.search(r"generation stopped \(status \d+\) with [1-9]\d* new record\(s\) since the start "
                     rf"\(restart 0\); requeueing job {job_id} to carry on", first_run), first_run
    with open(output, encoding="utf-8") as handle:  # complete lines only
        written = Counter(json.loads(line)["custom_id"] for line in handle if line.endswith("\n"))
    assert len(written) > requeued_with
    assert [i for i, c in written.items() if c > 1] == [], "the rerun wrote some requests again"
    assert set(written) <= set(ids)


@pytest.mark.slurm
def test_a_job_without_progress_is_requeued_at_most_the_limit_then_stops(slurm_cluster, tiny_model):
    """USR1 while the model still loads, in every run: with DATAGEN_MAX_REQUEUES=1 the first
    run requeues, the rerun (SLURM_RESTART_COUNT=1) does not; it ends FAILED with the reason
    in its log instead of requeueing forever."""
    write_prompts(Path("prompts.jsonl"), 50)
    job_id = sbatch(slurm_cluster, env=job_env(tiny_model, BATCH_SIZE="1", DATAGEN_MAX_REQUEUES="1"))
    log = Path(f"logs/datagen-{job_id}_4294967294.out")

    def text():
        return log.read_text() if log.exists() else ""

    def state():
        return slurm_cluster.run("squeue", "-h", "-j", job_id, "-t", "all", "-o", "%T").strip()

    for run in (1, 2):
        # The signal follows the generator's start by a fraction of a second: it is still
        # importing torch, far from its first record.
        wait_until(lambda: text().count("[job_script] generator started (pid ") == run,
                   f"run {run} to start its generator", slurm_cluster)
        slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_until(lambda: state() in TERMINAL, "the job to end", slurm_cluster)

    assert state() == "FAILED"
    runs = runs_in_log(text())
    assert len(runs) == 2 and "restart 0," in runs[0] and "restart 1," in runs[1], runs
    assert text().count("USR1 at ") == 2
    assert text().count(f"with 0 new record(s) since the start (restart 0); requeueing job {job_id}") == 1
    assert "requeueing job" not in text().split(runs[1])[1]
    message = ("job_script.sh: error: no new record since the last start and 1 restart already; not requeueing: "
               "give the job more time (--time) or a smaller --batch_size")
    assert text().splitlines().count(message) == 1
    assert line_count(Path("generations.jsonl")) == 0
