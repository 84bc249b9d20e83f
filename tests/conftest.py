"""Shared fixtures: a tiny random LLaMA with a real SentencePiece tokenizer, and a
helper that runs a script on 2 real gloo ranks with torchrun."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), num_layers=4)


def _free_port() -> int:
    """A TCP port free on the loopback address now. The suite runs on two pytest-xdist workers
    (pyproject.toml), and a port is checked here but bound later by torchrun: each worker draws
    from its own range, so the two never pick the same one in between."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    low = 20000 + 4000 * (worker % 8)
    for port in random.sample(range(low, low + 4000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + 4000}")


# The files that start the most ranks, first: pytest-xdist hands each worker whole files
# (--dist loadfile) in this order, so the long ones do not end up alone at the end.
# Most costly first (each file alone, -n 0: CPU seconds, measured 2026-12 on the project's 2 cores).
LONG_FILES = ("test_cluster_failures.py", "test_resume.py", "test_resume_world_size.py", "test_engine.py",
              "test_prune_zero3.py", "test_recipes.py", "test_shared_scale.py", "test_disk_full.py",
              "test_train_cli.py", "test_compute_dtype.py", "test_selection_cli.py", "test_fused_loss.py",
              "test_planner.py", "test_model.py", "test_export.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order inside a file, and of the other files, is kept


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks on 2 cores
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_ranks(script: str | Path, args: list[str], nproc: int = 2, timeout: int = 600,
              check: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc script args``: real processes, real gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", str(script), *args]
    env = subprocess_env()
    env.update(extra_env or {})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_ranks_many(runs: list[list[str]], logs_dir: Path, nproc: int = 2, timeout: int = 1200,
                   check: bool = True, envs: list[dict] | None = None) -> list[subprocess.CompletedProcess]:
    """``launch/train.py`` with each argv of ``runs``, one after another, in one set of
    ``nproc`` rank processes (tests/workers/train_many.py: it saves the start of the
    processes, most of a tiny run). Returns one CompletedProcess per run: its exit code
    (``train.run_cli``'s, the same on every rank or the mismatch is an error) and rank 0's
    output as ``stderr`` (the others' are in ``logs_dir/run<I>.rank<R>``). ``check``: every run
    must exit 0. ``envs``: each run's own additions to the environment (signal and error
    injection, ``loradrop_ds.faults``). For runs whose tests read what they wrote or said; a test of how a
    fresh process behaves (SIGKILL, another world size) starts its own with :func:`run_ranks`."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    jobs = [{"argv": list(map(str, argv)), "log": str(logs_dir / f"run{i}"), "env": (envs or [{}] * len(runs))[i]}
            for i, argv in enumerate(runs)]
    (logs_dir / "jobs.json").write_text(json.dumps(jobs))
    run_ranks(REPO / "tests" / "workers" / "train_many.py", [str(logs_dir / "jobs.json")], nproc=nproc, timeout=timeout)
    results = []
    for job in jobs:
        codes = {int(Path(f"{job['log']}.code{r}").read_text()) for r in range(nproc)}
        log = Path(f"{job['log']}.rank0").read_text()
        if len(codes) != 1 or (check and codes != {0}):
            raise AssertionError(f"train.py {' '.join(job['argv'])} exited {sorted(codes)} on its ranks:\n{log[-5000:]}")
        results.append(subprocess.CompletedProcess(job["argv"], codes.pop(), "", log))
    return results


def run_two_nodes(script: str | Path, args: list[list[str]], envs: list[dict] | None = None,
                  timeout: int = 240, wait_for: tuple[int, ...] = (0, 1), launcher_args: tuple[str, ...] = (),
                  during=None) -> list[subprocess.CompletedProcess]:
    """Two launchers, as on two machines: ``torchrun --nnodes 2 --node_rank R
    --nproc_per_node 1 *launcher_args`` on the loopback address, each with its own arguments
    and environment, so neither launcher can kill the other's rank. ``during(launchers)``, if
    given, runs once both have started (to signal one, say). The nodes in ``wait_for`` must
    end within ``timeout`` seconds (a rank left waiting for a failed one would not); the
    others are killed then and their result has returncode None."""
    port = _free_port()
    procs, logs = [], []  # output to files, not pipes: nothing blocks on a full pipe while `during` runs
    for node, node_args in enumerate(args):
        env = subprocess_env()
        env.update((envs or [{}, {}])[node])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={port}", *launcher_args, str(script), *node_args]
        logs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[-1][0], stderr=logs[-1][1], text=True))

    def result(node: int, code: int | None) -> subprocess.CompletedProcess:
        for f in logs[node]:
            f.seek(0)
        return subprocess.CompletedProcess(procs[node].args, code, logs[node][0].read(), logs[node][1].read())

    results: list = [None, None]
    try:
        if during is not None:
            during(procs)
        for node in wait_for:
            results[node] = result(node, procs[node].wait(timeout=timeout))
    finally:
        for node, proc in enumerate(procs):
            if proc.poll() is None:
                # SIGTERM: torchrun then terminates its worker (which runs in a session of
                # its own, out of reach of a kill of the launcher's group).
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if results[node] is None:
                results[node] = result(node, None)
            for f in logs[node]:
                f.close()
    return results


def worker_exit_code(launcher_output: str) -> int | None:
    """The exit code torchrun reports for its (one) failed worker, or None if none failed."""
    import re

    m = re.search(r"exitcode\s*:\s*(-?\d+)", launcher_output)
    return int(m.group(1)) if m else None


def run_python(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """A single process, as a user would run ``python launch/train.py ...``."""
    env = subprocess_env()
    env.update({"MASTER_PORT": str(_free_port())})
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def finished_run_args(model_dir, out_dir, *extra) -> list[str]:
    """A short 2-rank LoRA-drop run of the tiny model with checkpoints every 2 steps.
    Dropout is on, so exact resumption also needs the RNG state."""
    return [f"model.path={model_dir}", f"output_dir={out_dir}", "deepspeed=ds_configs/zero3_tiny.json",
            "loradrop.sampling_steps=4", "loradrop.sample_ratio=0.05", "loradrop.threshold=0.6",
            "loradrop.sampling_lr=0.01", "train.max_steps=6", "train.warmup_steps=1", "train.lr=0.01",
            "train.micro_batch_size=4", "data.max_eval_examples=16", "lora.dropout=0.1",
            "lora.target_modules=[q_proj,v_proj,up_proj]", "train.save_every=2", "train.keep_last=3",
            "train.save_probe_logits=true", *extra]


@pytest.fixture(scope="session")
def finished_run(tiny_model, tmp_path_factory) -> Path:
    """An uninterrupted run (the reference for resume tests, the source for export tests)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_ranks(REPO / "launch" / "train.py", finished_run_args(tiny_model, out))
    return out


def assert_adapter_reproduces_run(model_dir, out_dir, tol: float = 1e-5, dtype: str = "float32",
                                  rtol: Optional[float] = None) -> None:
    """The run's saved adapter, reloaded in plain transformers + peft (on a ``dtype`` base, one
    process, no DeepSpeed), gives the logits the trained ZeRO-3 model gave on the first eval
    batch (``train.save_probe_logits``) at every real token, within ``tol`` (``rtol``: the
    relative tolerance, ``tol`` unless given; summation order), and they differ from the base
    model's: training changed something."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    probe = load_file(Path(out_dir) / "probe_logits.safetensors")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(base, Path(out_dir) / "adapter").eval()
    inputs = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
    mask = probe["attention_mask"].bool()
    with torch.no_grad():
        logits = model(**inputs).logits.float()
        with model.disable_adapter():
            base_logits = model(**inputs).logits.float()
    torch.testing.assert_close(logits[mask], probe["logits"][mask].float(), rtol=tol if rtol is None else rtol, atol=tol)
    assert (base_logits[mask] - probe["logits"][mask]).abs().max() > 1e-4
