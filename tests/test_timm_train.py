"""timm's own train.py, unmodified, trains a zoo model and anneals its temperature (slow; needs a
pytorch-image-models checkout named by KERNELWAREHOUSE_TIMM_REPO)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_data import write_image_folder

REPO = os.environ.get("KERNELWAREHOUSE_TIMM_REPO")
RUN_TRAIN_PY = (
    "import kernelwarehouse, runpy, sys; sys.argv[0] = 'train.py'; "
    "runpy.run_path('train.py', run_name='__main__')"
)


@pytest.mark.slow
@pytest.mark.skipif(
    not REPO or not (Path(REPO) / "train.py").is_file(),
    reason="set KERNELWAREHOUSE_TIMM_REPO to a pytorch-image-models checkout",
)
def test_timms_train_py_trains_a_kw_model_and_anneals_tau(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=8, size=32)
    steps, batch = 4, 4  # 16 training images: 4 steps of 4 in the epoch
    anneal_steps = 8
    command = [
        sys.executable,
        "-c",
        RUN_TRAIN_PY,
        "--data-dir",
        str(root),
        "--train-split",
        "train",
        "--val-split",
        "val",
        "--model",
        "kw_resnet18",
        "--num-classes",
        "2",
        "--input-size",
        "3",
        "32",
        "32",
        "--model-kwargs",
        "budget=1",
        "small_input=True",
        "channels=(4,8,16,32)",
        "stem_width=4",
        f"anneal_steps={anneal_steps}",
        "--epochs",
        "1",
        "-b",
        str(batch),
        "--workers",
        "0",
        "--no-prefetcher",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "out"),
        "--experiment",
        "kw",
        "--sched",
        "cosine",
        "--warmup-epochs",
        "0",
        "--lr",
        "0.01",
        "--checkpoint-hist",
        "1",
        "--log-interval",
        "1",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "out" / "kw" / "last.pth.tar", map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    assert int(state["temperature_annealing.steps_done"]) == steps
    taus = {float(v) for k, v in state.items() if k.endswith("attention.temperature")}
    assert taus == {1 - (steps - 1) / anneal_steps}  # tau of the last step taken
