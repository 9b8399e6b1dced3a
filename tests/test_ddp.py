"""kw train under torchrun: two CPU processes, DDP over gloo; ranks agree, rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from kernelwarehouse.train import load_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_two_process_ddp_training(tmp_path):
    output = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "kernelwarehouse.cli",
        "train",
        "--model",
        "kw_resnet18",
        "--budget",
        "1/2",
        "--data",
        "digits",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--temp-epochs",
        "1",
        "--limit-train",
        "64",
        "--limit-val",
        "17",
        "--model-kwargs",
        "channels=(4,8,16,32)",
        "stem_width=4",
        "--device",
        "cpu",
        "--output",
        str(output),
        "--log-interval",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # one line per epoch and one summary, printed by rank 0 only
    assert result.stdout.count("epoch 2/2") == 1 and result.stdout.count("done:") == 1
    history = json.loads((output / "metrics.json").read_text())
    assert [(row["world_size"], row["ranks_agree"]) for row in history] == [(2, True), (2, True)]
    state = load_checkpoint(output / "last.pt")
    # 64 samples over 2 ranks, 32 each: 4 steps of 8 per epoch, tau annealed over the first epoch
    assert state["step"] == 8 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert [entry["tau"] for entry in state["steps"]] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0]
    # validation is sharded (9 samples in 2 batches on rank 0, 8 in 1 batch on rank 1) and summed over
    # both shards, so top-1 counts correct images out of all 17
    assert round(history[-1]["val_top1"] * 17 / 100, 6).is_integer()
    assert not any(name.endswith(".tmp") for name in os.listdir(output))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
