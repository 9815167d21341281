"""Two "nodes" on one machine: the SLURM template's launch (configs/slurm/train.sbatch -> srun -> one
configs/launch_node.sh per node -> `accelerate launch` with configs/accelerate/multi_node.yaml), two launchers
with machine ranks 0 and 1 meeting at 127.0.0.1, CPU processes over gloo, trains exactly as one launcher
with two processes does.

SLURM itself is not on a CI machine. Its two commands the template calls are stood in for by the few lines
SLURM's do for a 2-node job whose nodes are both this host: `scontrol show hostnames` prints the host, and
`srun` starts the command once per node with that node's SLURM_NODEID (SLURM_NNODES comes from the job).
Everything from launch_node.sh on is the real thing.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat_unsloth.checkpoint import store as ckpt

from cpu_launch import free_port
from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

REPO = Path(__file__).resolve().parents[1]
STEPS = 4

SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 1
echo 127.0.0.1
"""
# one task per node, each with its node id; fails when any task fails (as --kill-on-bad-exit does)
SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" > "$SRUN_LOG_DIR/node$node.out" 2> "$SRUN_LOG_DIR/node$node.err" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""


def _env(tmp: Path) -> dict:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # the venv's `accelerate` first, as in an activated environment
    env["PATH"] = f"{tmp / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _train_args(base: Path, tag: str) -> list[str]:
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", str(STEPS), "--model-tag", tag]
    args[args.index("--total-batch-size") + 1] = "128"  # 2 x 32 tokens x 2 processes: 1 micro-step each
    return args


def _losses(base: Path, tag: str) -> list[float]:
    lines = (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line.strip()]


@pytest.mark.slow
def test_two_node_launch_on_one_machine_equals_one_launcher(tmp_path):
    base = make_train_base_dir(tmp_path / "base")
    (tmp_path / "bin").mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        path = tmp_path / "bin" / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = _env(tmp_path)

    # one launcher, two processes
    one = subprocess.run(
        ["accelerate", "launch", "--config_file", "configs/accelerate/multi_gpu.yaml", "--num_processes", "2",
         "--main_process_port", str(free_port()), "-m", "nanochat_unsloth.train", *_train_args(base, "one")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "x 2 procs x 1 accum" in one.stdout, one.stdout[-2000:]

    # two nodes of one GPU ("process") each, through the SLURM template
    (tmp_path / "logs").mkdir()
    job = {"SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1",
           "MASTER_PORT": str(free_port()), "SRUN_LOG_DIR": str(tmp_path / "logs")}
    two = subprocess.run(["bash", "configs/slurm/train.sbatch", *_train_args(base, "two")],
                         env={**env, **job}, cwd=REPO, capture_output=True, text=True, timeout=300)
    logs = {p.name: p.read_text() for p in sorted((tmp_path / "logs").iterdir())}
    assert two.returncode == 0, {name: text[-2000:] for name, text in logs.items()}
    for node in (0, 1):
        # each node's launcher started one worker; together they are one 2-process job
        assert "x 2 procs x 1 accum" in logs[f"node{node}.out"], logs[f"node{node}.out"][-2000:]

    # Bitwise, not approximately: the same world size, the same rank -> data windows, and gloo's all-reduce of
    # two ranks adds the same two numbers whether the ranks share a launcher or not. A node rank or world
    # size taken wrongly from the environment would change the data each rank reads, and so the losses.
    losses = _losses(base, "one")
    assert len(losses) == STEPS
    assert _losses(base, "two") == losses
    want = ckpt.load_model_state_dict(base / "runs" / "one" / ckpt.step_dir_name(STEPS))
    got = ckpt.load_model_state_dict(base / "runs" / "two" / ckpt.step_dir_name(STEPS))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("missing, words", [
    ("NODE_RANK", "no node rank"), ("NNODES", "no node count"), ("MASTER_ADDR", "no MASTER_ADDR")])
def test_launch_node_refuses_without_its_environment(missing, words):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"NODE_RANK": "0", "NNODES": "2", "MASTER_ADDR": "127.0.0.1"})
    del env[missing]
    out = subprocess.run(["bash", "configs/launch_node.sh", "--depth=2"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and words in out.stderr, out.stderr


def test_nodes_that_do_not_share_the_base_dir_are_refused_before_training(tmp_path):
    """Two nodes, each with its own copy of the base dir (a node-local disk): the main process alone would
    checksum, rename and prune checkpoints that lack node 1's files. Both nodes refuse in one line naming the
    rank that cannot see the run dir, before the model is built; nothing is trained or saved."""
    import shutil

    bases = [make_train_base_dir(tmp_path / "base0")]
    bases.append(Path(shutil.copytree(bases[0], tmp_path / "base1")))
    env = {k: v for k, v in _env(tmp_path).items() if not k.startswith("SLURM_")}
    env.update({"NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    nodes = [subprocess.Popen(["bash", "configs/launch_node.sh", *_train_args(base, "local")], cwd=REPO,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank, base in enumerate(bases)]
    outs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode != 0, out[-2000:]
        assert "rank 1 on " in err and "cannot read what rank 0 writes there; put --base_dir on a file system " \
            "every node sees" in err, err[-3000:]
    for base in bases:
        assert not list(ckpt.list_checkpoints(base / "runs" / "local"))
        assert not (base / "runs" / "local" / "metrics.jsonl").exists()
        assert not (base / "runs" / "local" / ckpt.SHARED_PROBE).exists()


@pytest.mark.parametrize("given, want", [(None, "180"), ("600", "600")])
def test_launch_node_gives_a_stop_time_to_save_before_the_launcher_kills(tmp_path, given, want):
    """torch's launcher SIGKILLs the workers 30 s after it forwards a SIGTERM unless TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    says otherwise; launch_node.sh sets 180 s (a step and a large model's save), keeping a value the user set.
    `accelerate` is stood in for by a script that prints what it was started with."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "accelerate"
    fake.write_text('#!/usr/bin/env bash\necho "timeout=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-unset} args=$*"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in _env(tmp_path).items() if not k.startswith("SLURM_") and k != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    env.update({"NODE_RANK": "0", "NNODES": "2", "MASTER_ADDR": "127.0.0.1", **({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": given}
                                                                                if given else {})})
    out = subprocess.run(["bash", "configs/launch_node.sh", "--depth=2"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"timeout={want} args=launch --config_file"), out.stdout
    assert "--machine_rank 0" in out.stdout and out.stdout.rstrip().endswith("-m nanochat_unsloth.train --depth=2")
