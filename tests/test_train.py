"""The trainer: tau every step, checkpoints, EMA, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kernelwarehouse.core.temperature import get_temperature, linear_temperature
from kernelwarehouse.train import ModelEma, TrainConfig, Trainer, load_checkpoint
from kernelwarehouse.train.checkpoint import save_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = {"channels": (4, 8, 16, 32), "stem_width": 4}


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    values = dict(
        model="kw_resnet18",
        budget="1/2",
        data="digits",
        model_kwargs=TINY,
        epochs=2,
        batch_size=16,
        lr=0.05,
        temp_epochs=1.5,
        limit_train=96,
        limit_val=48,
        device="cpu",
        output=str(tmp_path / "run"),
        log_interval=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_tau_follows_the_schedule_every_step_and_is_stored(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), log=None)
    history = trainer.fit()
    per_epoch = trainer.steps_per_epoch
    assert per_epoch == 6 and trainer.step == 12
    anneal = round(1.5 * per_epoch)
    taus = [entry["tau"] for entry in trainer.step_log]
    assert taus == [linear_temperature(s, anneal) for s in range(12)]
    assert taus[0] == 1.0 and taus[-1] == 0.0 and taus[4] == pytest.approx(1 - 4 / 9)
    assert get_temperature(trainer.model) == 0.0
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["temperature"]["steps_done"] == 12 and state["temperature"]["tau"] == 0.0
    assert state["epoch"] == 2 and state["step"] == 12 and state["config"]["budget"] == "1/2"
    assert set(state["rng"][0]) >= {"torch", "numpy", "python"}
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[-1]["tau"] == 0.0 and history[0]["tau"] == pytest.approx(1 - 5 / 9)
    # lr: cosine over 12 steps, one scheduler step per training step
    assert [e["lr"] for e in trainer.step_log][:2] == pytest.approx(
        [0.05 * 0.5 * (1 + torch.cos(torch.tensor(s * torch.pi / 12)).item()) for s in (1, 2)]
    )
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == history
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,train_loss,train_top1")
    assert len((run / "steps.csv").read_text().splitlines()) == 13
    best = load_checkpoint(run / "best.pt")
    assert best["best"]["epoch"] == best["epoch"] == trainer.best["epoch"]
    assert trainer.best["top1"] == max(row["val_top1"] for row in history)


def test_checkpoints_store_the_paths_taken_and_resume_reuses_them(tmp_path, monkeypatch):
    import kernelwarehouse as kw
    import kernelwarehouse.core.choice as choice

    monkeypatch.setattr(
        choice, "time_candidate", lambda run, device, name, best: float(len(name))
    )  # fake timings
    monkeypatch.setattr(choice, "_mode", "measured")
    kw.clear_path_choices()
    Trainer(tiny_config(tmp_path, epochs=1), log=None).fit()
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    taken = state["path_choices"]
    assert taken and taken == kw.path_choices()
    assert any(key.endswith("|train") for key in taken) and any(key.endswith("|infer") for key in taken)
    # a resumed run takes them from the checkpoint, whatever this process chose before
    kw.clear_path_choices()
    kw.load_path_choices({key: "grouped" for key in taken})
    Trainer(tiny_config(tmp_path, epochs=2), resume=tmp_path / "run" / "last.pt", log=None)
    assert kw.path_choices() == taken
    kw.clear_path_choices()


def test_static_model_trains_and_learns_digits(tmp_path):
    config = tiny_config(
        tmp_path,
        model="resnet18",
        budget=None,
        epochs=3,
        limit_train=400,
        limit_val=120,
        lr=0.1,
        batch_size=32,
    )
    history = Trainer(config, log=None).fit()
    assert history[-1]["tau"] is None
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_top1"] > 50  # chance is 10 %


def test_static_model_rejects_a_budget(tmp_path):
    with pytest.raises(ValueError, match="static model"):
        Trainer(tiny_config(tmp_path, model="resnet18"), log=None)


def test_batch_size_one_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="batch-size 1 .*BatchNorm"):
        Trainer(tiny_config(tmp_path, batch_size=1), log=None)
    assert not (tmp_path / "run").exists()


def test_a_last_batch_of_one_sample_is_dropped_not_fatal(tmp_path):
    # 17 samples in batches of 16 would end with a single sample, which BatchNorm cannot train on
    trainer = Trainer(tiny_config(tmp_path, limit_train=17, epochs=1), log=None)
    trainer.fit()
    assert trainer.steps_per_epoch == 1 and trainer.step == 1


def test_ema_averages_each_shared_parameter_once():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    model.add_module("shared", model[0])  # the same module twice, as warehouses are
    ema = ModelEma(model, decay=0.5)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model)
    decay = min(0.5, 2 / 11)
    assert torch.allclose(ema.module[0].weight, before * decay + model[0].weight * (1 - decay))
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert ema.module.shared is ema.module[0]


def test_ema_run_reports_ema_accuracy(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, ema=True, ema_decay=0.9, epochs=1), log=None)
    row = trainer.fit()[-1]
    assert {"ema_top1", "ema_top5", "ema_loss"} <= set(row)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["ema"]["updates"] == trainer.step == 6


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"value": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint({"value": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def _train_command(output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kernelwarehouse.cli",
        "train",
        "--model",
        "kw_resnet18",
        "--budget",
        "1",
        "--data",
        "digits",
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--lr",
        "0.05",
        "--temp-epochs",
        "2",
        "--limit-train",
        "320",
        "--limit-val",
        "40",
        "--model-kwargs",
        "channels=(4,8,16,32)",
        "stem_width=4",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--output",
        str(output),
        "--no-progress",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """A run killed with SIGKILL mid-training and resumed from last.pt ends with exactly the weights,
    optimizer state and metrics of an uninterrupted run."""
    reference = subprocess.run(_train_command(tmp_path / "whole"), env=_env(), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    run = tmp_path / "killed"
    process = subprocess.Popen(
        _train_command(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    done = load_checkpoint(run / "last.pt")["epoch"]
    assert 1 <= done < 4  # killed during training, with at least one epoch saved
    resumed = subprocess.run(
        [sys.executable, "-m", "kernelwarehouse.cli", "train", "--resume", str(run / "last.pt")],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    whole, again = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(run / "last.pt")
    assert again["epoch"] == 4 and again["step"] == whole["step"]
    assert whole["model"].keys() == again["model"].keys()
    for key, value in whole["model"].items():
        assert torch.equal(value, again["model"][key]), key
    for a, b in zip(whole["optimizer"]["state"].values(), again["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert whole["temperature"] == again["temperature"]
    for a, b in zip(whole["history"], again["history"]):
        assert {k: v for k, v in a.items() if "time" not in k} == {
            k: v for k, v in b.items() if "time" not in k
        }


def test_a_recipe_is_a_set_of_overrides_of_the_train_config():
    from dataclasses import fields

    from kernelwarehouse.train import RECIPES, Recipe, TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    for recipe in RECIPES.values():
        assert set(recipe.options()) <= names
        TrainConfig(model="resnet18", **recipe.options())  # every recipe is a valid configuration
    assert Recipe("short", "", {"epochs": 3}).options()["lr"] == TrainConfig(model="x").lr
    with pytest.raises(ValueError, match="not training options"):
        Recipe("bad", "", {"device": "cuda"})
