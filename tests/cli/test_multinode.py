"""Two nodes, simulated on one machine: torchrun launches 1 process on each of 2 "nodes" (a c10d rendezvous on
127.0.0.1, gloo). Each node reads a disjoint part of every epoch, the losses equal a 1-node 2-process run's, and after
one node is killed, ``resume=auto`` on both continues exactly."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import pretrain_args, write_images

STEPS = 8  # 40 images, 2 x 4 a step: 5 steps an epoch, so the run crosses an epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(images: Path, run_dir: Path, *extra: str) -> list[str]:
    return pretrain_args(images, run_dir, "data.batch_size=4", "schedule.epochs=2", f"trainer.max_steps={STEPS}",
                         "checkpoint.every_n_steps=2", "trainer.accelerator=cpu", "trainer.strategy=ddp",
                         "model.drop_path_rate=0.1", "threads=1", *extra)  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for path in sorted(run_dir.glob("logs/version_*/csv/metrics.csv"), key=lambda p: int(p.parts[-3][8:])):
        with open(path) as f:
            out.update({int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")})
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def _nodes(images: Path, run_dir: Path, *extra: str) -> list[subprocess.Popen]:
    """Both nodes' torchrun agents, each in its own process group (so a node can be killed whole)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=simmim-test", "--max-restarts=0", "-m", "simmim.pretrain",
           *_args(images, run_dir, "trainer.num_nodes=2", "trainer.devices=1", *extra)]  # fmt: skip
    return [
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
        for _ in range(2)
    ]  # fmt: skip


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``: torchrun's workers run in sessions of their own, so a process-group kill of the
    agent leaves them running (holding the test's pipes open, blocked on a collective)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found += children
        todo += children
    return found


def _kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node: its agent and every process it started."""
    for pid in (*_descendants(proc.pid), proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-2000:] + err[-4000:]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("multinode") / "images", 40)


@pytest.fixture(scope="module")
def one_node(images, tmp_path_factory) -> dict[int, float]:
    """The reference: one node, two processes (Lightning's launcher)."""
    run_dir = tmp_path_factory.mktemp("one_node")
    res = subprocess.run([sys.executable, "-m", "simmim.pretrain", *_args(images, run_dir, "trainer.devices=2")],
                         capture_output=True, text=True, timeout=600, env=_env())  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    return _losses(run_dir)


@pytest.mark.slow
def test_two_nodes_equal_one_node_of_two_processes(one_node, images, tmp_path):
    run_dir = tmp_path / "two_nodes"
    _wait(_nodes(images, run_dir))
    got = _losses(run_dir)
    assert sorted(got) == sorted(one_node) == list(range(STEPS))
    for step, loss in one_node.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), step


@pytest.mark.slow
def test_a_killed_node_and_resume_auto_on_both_continue_exactly(one_node, images, tmp_path):
    run_dir = tmp_path / "killed"
    procs = _nodes(images, run_dir)
    deadline = time.time() + 300
    # Lightning writes a step's checkpoint before that step's log row: wait for both, so that the losses compared
    # below are all on disk (the training state a resume continues from is exact either way)
    while not ((run_dir / "checkpoints" / "step=000004.ckpt").exists() and 3 in _losses(run_dir)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the run ended before the kill"
        time.sleep(0.05)
    _kill_node(procs[1])  # one node dies; the other then fails or hangs on a collective
    time.sleep(2)
    _kill_node(procs[0])
    for proc in procs:
        proc.communicate(timeout=60)
    _wait(_nodes(images, run_dir, "resume=auto"))
    got = _losses(run_dir)
    assert sorted(got) == list(range(STEPS))
    for step, loss in one_node.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), step
