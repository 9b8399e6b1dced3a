"""The training loop of ``kw train``: one process or DDP (torchrun), exact resume, tau every step.

The temperature tau of every KernelWarehouse attention follows the paper's schedule (Li & Yao, ICML
2024, Sec. 3.3): linear from 1 to 0 over ``temp_epochs`` epochs, set before each training step by
:class:`~kernelwarehouse.core.temperature.TemperatureSchedule`, logged, and stored in checkpoints.

Exact resume: the data order of an epoch depends on (seed, epoch) only, checkpoints are taken at
epoch ends and hold the model, optimizer, LR schedule, temperature schedule, EMA, loss scaler, step
counter and every random state of every process, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..core.attention import KWAttention
from ..core.build import kw_layers
from ..core.choice import load_path_choices, path_choices
from ..baselines.temperature import baseline_temperature, set_baseline_temperature
from ..core.temperature import TemperatureSchedule
from ..models.registry import create_model, model_entry
from .checkpoint import (
    FORMAT,
    VERSION,
    config_differences,
    load_checkpoint,
    publish,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig
from .environment import DistEnv, resolve_device, seed_everything, seed_worker
from .output import csv_text, tensorboard_writer, write_atomic
from .progress import ProgressLines, print_above_bars, progress_bar
from .data import Augmentation, DataInfo, EpochBatches, collate_readable, load_data
from .ema import ModelEma
from .evaluate import count_parameters, evaluate


def build_model(config: TrainConfig, info: DataInfo) -> nn.Module:
    """The registered model for the dataset: its classes and channels, the small-image stem when the
    images are small. Static models take no budget; a dynamic model without one gets its default."""
    model_entry(config.model).check_budget(config.budget)  # before any data-dependent option is added
    kwargs: dict[str, Any] = {"in_chans": info.in_chans}
    if info.small_input:
        kwargs["small_input"] = True
    if config.drop_path:
        kwargs["drop_path_rate"] = config.drop_path
    kwargs.update(config.model_kwargs)
    try:
        return create_model(config.model, budget=config.budget, num_classes=info.num_classes, **kwargs)
    except TypeError as error:
        raise ValueError(f"model {config.model!r} rejects its options {sorted(kwargs)}: {error}") from None


def batch_mixing(config: TrainConfig, num_classes: int):
    """timm's :class:`~timm.data.Mixup` (mixup and cutmix, one of the two per batch, with the label
    smoothing folded into the mixed targets), or None when the run mixes nothing."""
    if not (config.mixup or config.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=config.mixup,
        cutmix_alpha=config.cutmix,
        label_smoothing=config.label_smoothing,
        num_classes=num_classes,
    )


def check_batch_size(model: nn.Module, batch_size: int) -> None:
    """BatchNorm, in the attention branch or elsewhere, cannot train on a batch of one sample."""
    if batch_size > 1:
        return
    if any(isinstance(m, KWAttention) and isinstance(m.norm, nn.BatchNorm1d) for m in model.modules()):
        raise ValueError(
            "--batch-size 1 cannot train KernelWarehouse attention with BatchNorm (it needs >= 2 "
            "samples per batch); use --batch-size 2 or more, or --model-kwargs norm=layer"
        )
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(
            "--batch-size 1 cannot train a model with BatchNorm layers; use --batch-size 2 or more"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Trainer:
    """Builds data, model, optimizer and schedules from a :class:`TrainConfig` (or a checkpoint to
    resume) and trains with :meth:`fit`. Under torchrun it trains with DDP (gloo on CPU, NCCL on
    CUDA), every rank on its shard; only rank 0 writes files."""

    def __init__(
        self,
        config: TrainConfig,
        resume: str | os.PathLike | None = None,
        log: Callable[[str], None] | None = print,
        progress: bool | None = None,
    ) -> None:
        self.config = config
        self.env = DistEnv.from_environment()
        self.progress = self.env.is_main and (sys.stderr.isatty() if progress is None else progress)
        if self.progress and log is print:
            log = print_above_bars
        self.log = log if self.env.is_main and log is not None else (lambda message: None)
        state = load_checkpoint(resume) if resume is not None else None
        if state is not None:
            differences = config_differences(state["config"], asdict(config))
            if differences:
                raise ValueError(
                    f"--resume {str(resume)!r}: the checkpoint's run differs in {'; '.join(differences)}"
                )
        self.device = resolve_device(config.device, self.env.local_rank)
        self.amp = config.amp and self.device.type == "cuda"
        if config.amp and not self.amp:
            self.log("note: --amp applies on CUDA only; training in float32 on the CPU")
        seed_everything(config.seed, config.deterministic)
        augment = Augmentation(config.rand_augment, config.random_erasing)
        self.train_set, self.val_set, self.info = load_data(
            config.data,
            config.image_size,
            config.limit_train,
            config.limit_val,
            augment,
            config.skip_unreadable,
        )
        model = build_model(config, self.info)
        check_batch_size(model, config.batch_size)
        self.has_kw = bool(kw_layers(model))
        self.num_parameters = count_parameters(model)
        model.to(self.device)
        if config.channels_last and self.device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = self._optimizer(model)
        self.steps_per_epoch = len(
            EpochBatches(
                len(self.train_set), config.batch_size, config.seed, 0, self.env.rank, self.env.world_size
            )
        )
        self.total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.temperature = TemperatureSchedule(model, round(config.temp_epochs * self.steps_per_epoch))
        baseline_epochs = (
            config.temp_epochs if config.baseline_temp_epochs is None else config.baseline_temp_epochs
        )
        self.baseline_anneal_steps = round(baseline_epochs * self.steps_per_epoch)
        self.ema = ModelEma(model, config.ema_decay) if config.ema else None
        self.mixup = batch_mixing(config, self.info.num_classes)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.epoch, self.step, self.best = 0, 0, None
        self.history: list[dict[str, Any]] = []
        self.step_log: list[dict[str, Any]] = []
        if self.env.world_size > 1:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        # training randomness (dropout, augmentation) differs per rank; model init above did not
        seed_everything(config.seed + self.env.rank, config.deterministic)
        if state is not None:
            self._load_state(state)
        self.output = Path(config.output)
        self.tensorboard = None

    # -- set-up -----------------------------------------------------------------------------
    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)

    def _lr_factor(self, step: int) -> float:
        cfg, per_epoch = self.config, self.steps_per_epoch
        warmup = round(cfg.warmup_epochs * per_epoch)
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "step":
            return 0.1 ** (step // (cfg.step_epochs * per_epoch))
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(self.total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def _loader(self, dataset, epoch: int, train: bool) -> DataLoader:
        cfg, env = self.config, self.env
        batches = EpochBatches(len(dataset), cfg.batch_size, cfg.seed, epoch, env.rank, env.world_size, train)
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 101 + env.rank)
        collate = {"collate_fn": collate_readable} if cfg.skip_unreadable else {}
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=cfg.workers,
            generator=generator,
            worker_init_fn=seed_worker,
            pin_memory=self.device.type == "cuda",
            **collate,
        )

    # -- state ------------------------------------------------------------------------------
    def _gather(self, value: Any) -> list[Any]:
        if self.env.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(values, value)
        return values

    def state_dict(self) -> dict[str, Any]:
        """The full checkpoint. Under DDP every rank must call it (random states are gathered)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": asdict(self.config),
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "temperature": self.temperature.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "history": self.history,
            "steps": self.step_log,
            "rng": self._gather(rng_state()),
            "world_size": self.env.world_size,
            "data_info": asdict(self.info),
            "params": self.num_parameters,
            "path_choices": path_choices(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.temperature.load_state_dict(state["temperature"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        load_path_choices(state.get("path_choices") or {})  # the paths the interrupted run took
        self.epoch, self.step, self.best = state["epoch"], state["step"], state["best"]
        self.history, self.step_log = list(state["history"]), list(state["steps"])
        rngs = state["rng"]
        if len(rngs) == self.env.world_size:
            set_rng_state(rngs[self.env.rank])
        else:
            self.log(
                f"note: checkpoint of a {len(rngs)}-process run resumed on {self.env.world_size}; "
                f"random states are re-seeded"
            )
            seed_everything(self.config.seed + 1_000 * self.epoch + self.env.rank, self.config.deterministic)

    # -- training ---------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg, model = self.config, self.model
        model.train()
        loader = self._loader(self.train_set, epoch, train=True)
        totals = torch.zeros(
            4, dtype=torch.float64, device=self.device
        )  # loss sum, correct, samples, unreadable
        bar = progress_bar(loader, self.progress, f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        report = ProgressLines(self.log, epoch, cfg.epochs, len(loader)) if not self.progress else None
        for index, batch in enumerate(bar):
            images, labels = batch[0], batch[1]
            if len(batch) > 2:  # --skip-unreadable: the batch without the images that could not be read
                totals[3] += batch[2]
                if len(labels) == 0:
                    continue
            tau = self.temperature.step()
            # DY-Conv / ODConv baselines: their softmax temperature, 30 -> 1 over the same steps
            set_baseline_temperature(model, baseline_temperature(self.step, self.baseline_anneal_steps))
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if cfg.channels_last and self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            targets = None
            if self.mixup is not None:
                if len(labels) % 2:  # timm's mixing pairs each sample with the batch reversed
                    images, labels = images[:-1], labels[:-1]
                images, targets = self.mixup(images, labels)
            with torch.autocast(self.device.type, enabled=self.amp):
                logits = model(images)
                if targets is None:
                    loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
                else:  # soft targets: the mixed labels, smoothed
                    loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at step {self.step} (lower --lr?)")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(_unwrap(model))
            self.step += 1
            size = len(labels)
            totals[:3] += torch.tensor(
                [loss.item() * size, (logits.argmax(1) == labels).sum().item(), size],
                dtype=torch.float64,
                device=self.device,
            )
            lr = self.optimizer.param_groups[0]["lr"]
            if report is not None:
                report.step(index + 1, size, loss.item(), lr, tau if self.has_kw else None)
            if self.step % cfg.log_interval == 0:
                entry = {
                    "step": self.step,
                    "epoch": epoch + self.step_in_epoch() / self.steps_per_epoch,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "tau": tau if self.has_kw else None,
                    "loss": loss.item(),
                }
                self.step_log.append(entry)
                if self.tensorboard is not None:
                    for key in ("lr", "tau", "loss"):
                        if entry[key] is not None:
                            self.tensorboard.add_scalar(f"train/{key}", entry[key], self.step)
            if hasattr(bar, "set_postfix"):
                rate = bar.format_dict.get("rate") or 0.0
                postfix = {"img/s": f"{rate * size:.0f}", "loss": f"{loss.item():.3f}", "lr": f"{lr:.3g}"}
                if self.has_kw:
                    postfix["tau"] = f"{tau:.3f}"
                bar.set_postfix(postfix)
        if self.env.world_size > 1:
            dist.all_reduce(totals)
        loss_sum, correct, count, unreadable = totals.tolist()
        metrics = {"train_loss": loss_sum / max(count, 1), "train_top1": 100.0 * correct / max(count, 1)}
        if cfg.skip_unreadable:
            metrics["train_unreadable"] = int(unreadable)
        return metrics

    def step_in_epoch(self) -> int:
        return self.step - self.epoch * self.steps_per_epoch

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before each forward."""
        if self.env.world_size > 1:
            for buffer in _unwrap(self.model).buffers():
                dist.broadcast(buffer, 0)

    def ranks_agree(self) -> bool:
        """Whether every process holds the same weights (a checksum of all parameters and buffers)."""
        if self.env.world_size == 1:
            return True
        model = _unwrap(self.model)
        values = [t.detach().double().flatten() for t in (*model.parameters(), *model.buffers())]
        flat = torch.cat(values)
        checksum = torch.stack(
            [
                flat.sum(),
                (flat * flat).sum(),
                (flat * torch.arange(len(flat), dtype=flat.dtype, device=flat.device)).sum(),
            ]
        )
        gathered = [torch.zeros_like(checksum) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, checksum)
        return all(torch.equal(gathered[0], g) for g in gathered[1:])

    def fit(self) -> list[dict[str, Any]]:
        """Train from the current epoch to ``config.epochs``; returns the per-epoch metrics."""
        cfg = self.config
        if self.env.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            self.tensorboard = tensorboard_writer(self.output / "tensorboard", self.step)
            write_atomic(self.output / "config.json", json.dumps(asdict(cfg), indent=2, default=str))
        if self.epoch >= cfg.epochs:
            self.log(f"nothing to do: the checkpoint has finished {self.epoch} of {cfg.epochs} epochs")
        epochs = progress_bar(range(self.epoch, cfg.epochs), self.progress, "epochs")
        for epoch in epochs:
            start = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch + 1}
            row.update(self.train_one_epoch(epoch))
            train_time = time.perf_counter() - start
            self._sync_buffers()
            val_loader = self._loader(self.val_set, epoch, train=False)
            model = _unwrap(self.model)  # shards may differ in batch count: no collectives in forward
            row.update({f"val_{k}": v for k, v in evaluate(model, val_loader, self.device, self.amp).items()})
            if self.ema is not None:
                ema = evaluate(self.ema.module, val_loader, self.device, self.amp)
                row.update({f"ema_{k}": v for k, v in ema.items()})
            row.update(
                {
                    "step": self.step,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "tau": self.temperature.tau if self.has_kw else None,
                    "train_time": train_time,
                    "epoch_time": time.perf_counter() - start,
                }
            )
            agree = self.ranks_agree()
            if not agree:
                raise RuntimeError(f"DDP ranks hold different weights after epoch {epoch + 1}")
            row["ranks_agree"] = agree
            row["world_size"] = self.env.world_size
            self.epoch = epoch + 1
            score = row["ema_top1" if self.ema is not None else "val_top1"]
            improved = self.best is None or score > self.best["top1"]
            if improved:
                self.best = {"epoch": self.epoch, "top1": score}
            self.history.append(row)
            state = self.state_dict()
            if self.env.is_main:
                self._write(state, improved)
            tau = "" if row["tau"] is None else f"  tau {row['tau']:.3f}"
            if cfg.skip_unreadable:
                tau += (
                    f"  unreadable images skipped: {row['train_unreadable']} train, "
                    f"{row['val_unreadable']} val"
                )
            self.log(
                f"epoch {self.epoch}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                f"train {row['train_top1']:.2f}%  "
                f"val {row['val_top1']:.2f}% (top-5 {row['val_top5']:.2f}%, loss {row['val_loss']:.4f})"
                f"{tau}  lr {row['lr']:.4g}  {row['epoch_time']:.1f}s"
            )
        if self.tensorboard is not None:
            self.tensorboard.close()
        return self.history

    def _write(self, state: dict[str, Any], improved: bool) -> None:
        out = self.output
        save_checkpoint(state, out / "last.pt")
        if improved:
            fd, tmp = tempfile.mkstemp(prefix=".best.pt.", dir=out)
            os.close(fd)
            shutil.copyfile(out / "last.pt", tmp)
            publish(tmp, out / "best.pt")
        write_atomic(out / "metrics.json", json.dumps(self.history, indent=2))
        write_atomic(out / "metrics.csv", csv_text(self.history))
        write_atomic(out / "steps.csv", csv_text(self.step_log))
        if self.tensorboard is not None:
            row = self.history[-1]
            for key, value in row.items():
                if isinstance(value, float) and key not in ("epoch",):
                    self.tensorboard.add_scalar(f"epoch/{key}", value, row["epoch"])
