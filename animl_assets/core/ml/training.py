"""Training a species classifier on crops: data loading as the reference ``train_classifier.py`` (its
transforms, label weighting, detection-confidence weights), one epoch of training and one of validation as
plain functions returning metric dicts, and ``fit``: the loop with early stopping, atomic per-epoch
checkpoints and resume. Runs in one process or under ``torchrun`` (DDP): rank 0 writes and reports.

Accuracies are fractions (0–1) everywhere except the checkpoint's ``"val/acc"``, which keeps the reference's
percentage so reference tools read it unchanged.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from animl_assets.core.ml.data import CropDataset, eval_transform, resolve_device, train_transform
from animl_assets.core.ml.frames import SPLITS, top_ks
from animl_assets.core.ml.models import build_model, head, set_finetune, unwrap
from animl_assets.core.ml.recipe import BEST, EFFICIENTNETS, LAST, LITE0, Checkpoints, FitResult, TrainingParams


def init_model(params: TrainingParams, num_classes: int, pretrained: bool | str | Mapping[str, Any] = False
               ) -> nn.Module:
    """The model to train, its new layers initialised from ``params.seed``."""
    torch.manual_seed(params.seed)
    return build_model(params.model_name, num_classes, pretrained=pretrained, finetune=params.finetune > 0,
                       image_size=params.image_size)


class EpochSampler(Sampler[tuple[int, int]]):
    """Training order for one epoch from ``(seed, epoch)`` alone, so a resumed run draws what the original
    would: weighted draws with replacement (``weights``; the reference's WeightedRandomSampler) or a
    permutation; under DDP padded to a multiple of ``world_size`` and dealt out by rank. Each draw comes with
    its own augmentation seed (``CropDataset``), so loader workers hold no state a resume would lose."""

    def __init__(self, size: int, weights: torch.Tensor | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.size, self.weights, self.seed = size, weights, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.per_rank = math.ceil(size / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.per_rank * self.world_size
        if self.weights is not None:
            order = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        else:
            order = torch.randperm(self.size, generator=generator)
            order = torch.cat([order, order[: total - self.size]])
        seeds = torch.randint(0, 2**62, (total,), generator=generator)
        return zip(order[self.rank::self.world_size].tolist(), seeds[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank


def make_loaders(frame: pd.DataFrame, crops_root: str | Path, params: TrainingParams,
                 device: torch.device) -> dict[str, DataLoader]:
    """One loader per split present: train augmented and drawn by an ``EpochSampler`` (label-weighted when
    asked), val and test in order (sharded by rank under DDP)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    cuda = device.type == "cuda"
    loaders = {}
    for split in SPLITS:
        rows = frame[frame["split"] == split]
        if rows.empty:
            continue
        train = split == "train"
        dataset = CropDataset(crops_root, rows["path"], rows["label_index"], rows["weight"],
                              train_transform(params.image_size) if train else eval_transform(params.image_size))
        weights = dataset.weights if train and (params.label_weighted or params.weight_by_detection_conf) else None
        sampler = (EpochSampler(len(dataset), weights, params.seed, rank, world) if train
                   else range(rank, len(dataset), world))
        # its own generator: starting workers draws their base seed from it, not from the global RNG that
        # dropout uses (a resume starts them at another epoch than the original run did)
        loaders[split] = DataLoader(dataset, batch_size=params.batch_size, sampler=sampler,
                                    num_workers=params.num_workers, pin_memory=cuda,
                                    persistent_workers=params.num_workers > 0,  # no re-spawn per epoch
                                    generator=torch.Generator().manual_seed(params.seed))
    return loaders


class Totals:
    """Running sums for one epoch's metrics: loss and top-1/top-3 hits, plain and sample-weighted. Top-3
    is top-min(3, labels): with two labels it is trivially 1 rather than a crash, as in the reference."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.ks = top_ks(num_classes)
        # [count, loss, weight, weighted loss, hits@1, hits@3, weighted hits@1, weighted hits@3]
        self.sums = torch.zeros(8, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, losses: torch.Tensor) -> None:
        with torch.no_grad():
            top = logits.topk(max(self.ks), dim=1).indices
            hits = (top == labels[:, None]).cumsum(dim=1)[:, [k - 1 for k in self.ks]].double()
            w, losses = weights.double(), losses.double()
            count = torch.tensor([float(len(labels))], dtype=torch.float64, device=w.device)
            self.sums += torch.cat([count, torch.stack([losses.sum(), w.sum(), (losses * w).sum()]),
                                    hits.sum(0), (hits * w[:, None]).sum(0)])

    def metrics(self) -> dict[str, float]:
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        count, loss, weight, weighted_loss, top1, top3, weighted_top1, weighted_top3 = sums.tolist()
        count, weight = max(count, 1.0), max(weight, 1e-12)
        return {"loss": loss / count, "acc_top1": top1 / count, "acc_top3": top3 / count,
                "loss_weighted": weighted_loss / weight, "acc_weighted_top1": weighted_top1 / weight,
                "acc_weighted_top3": weighted_top3 / weight, "count": sums[0].item()}


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=amp and device.type == "cuda")


def _batches(loader: DataLoader, device: torch.device, channels_last: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels, weights, _ in loader:
        yield (images.to(device, non_blocking=True, memory_format=memory_format),
               labels.to(device, non_blocking=True), weights.to(device, non_blocking=True))


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, device: torch.device, *, amp: bool = True,
                    channels_last: bool = False, head_only: bool = False,
                    progress: Callable[[int, int, dict[str, float]], None] | None = None,
                    progress_every: int = 50) -> dict[str, float]:
    """One pass over ``loader`` updating ``model``; loss is unweighted (the sampler balances labels, as the
    reference). ``head_only``: BN and dropout stay in eval mode (the reference's fine-tune). Returns the
    epoch's metrics and ``crops_per_s``."""
    model.train(not head_only)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    totals = Totals(head(model).out_features, device)
    started, batches = time.perf_counter(), len(loader)
    for step, (images, labels, weights) in enumerate(_batches(loader, device, channels_last), start=1):
        with _autocast(device, amp):
            logits = model(images)
            losses = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses.mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        totals.add(logits.detach(), labels, weights, losses.detach())
        if progress is not None and progress_every and step % progress_every == 0 and step < batches:
            done = totals.sums[0].item()
            progress(step, batches, {"loss": totals.sums[1].item() / done,
                                     "crops_per_s": done / (time.perf_counter() - started)})
    metrics = totals.metrics()
    metrics["crops_per_s"] = metrics["count"] / (time.perf_counter() - started)
    return metrics


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, device: torch.device, *, amp: bool = True,
             channels_last: bool = False) -> dict[str, float]:
    """Loss and top-k accuracy of ``model`` over ``loader``, plain and sample-weighted, with ``crops_per_s``."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    totals = Totals(head(model).out_features, device)
    started = time.perf_counter()
    for images, labels, weights in _batches(loader, device, channels_last):
        with _autocast(device, amp):
            logits = model(images).float()
        totals.add(logits, labels, weights, loss_fn(logits, labels))
    metrics = totals.metrics()
    metrics["crops_per_s"] = metrics["count"] / (time.perf_counter() - started)
    return metrics


def make_optimizer(model: nn.Module, params: TrainingParams, device: torch.device
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The reference's choices: EfficientNets RMSprop (alpha 0.9, momentum 0.9) with the LR decaying 0.97
    every 2.4 epochs; ResNets SGD (momentum 0.9), LR ÷10 every 8 epochs. Fused kernels where the device has them."""
    if params.model_name in EFFICIENTNETS or params.model_name == LITE0:
        optimizer = torch.optim.RMSprop(model.parameters(), params.learning_rate, alpha=0.9, momentum=0.9,
                                        weight_decay=params.weight_decay, foreach=True)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.97 ** (1 / 2.4))
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.SGD(model.parameters(), params.learning_rate, momentum=0.9,
                                weight_decay=params.weight_decay, **fast)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=8, gamma=0.1)


def train_classifier(frame: pd.DataFrame, crops_root: str | Path, num_classes: int, params: TrainingParams,
                     checkpoints: Checkpoints, *, init: bool | str | Mapping[str, Any] = False, resume: bool = True,
                     on_epoch: Callable[[dict[str, float]], None] | None = None,
                     progress: Callable[[str], None] | None = None) -> FitResult:
    """Loaders, model and ``fit`` on ``params.device``: what one process (or each torchrun rank) runs."""
    device = resolve_device(params.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    loaders = make_loaders(frame, crops_root, params, device)
    model = init_model(params, num_classes, init)
    return fit(model, loaders, params, checkpoints, device, resume=resume, on_epoch=on_epoch, progress=progress)


def evaluate_checkpoint(checkpoint: Mapping[str, Any], frame: pd.DataFrame, crops_root: str | Path,
                        num_classes: int, params: TrainingParams, split: str = "test") -> dict[str, float]:
    """Metrics of a checkpoint's model on one split (eval transform), in this process."""
    rows = frame[frame["split"] == split]
    if rows.empty:
        return {}
    device = resolve_device(params.device)
    model = build_model(params.model_name, num_classes, image_size=params.image_size)
    model.load_state_dict(checkpoint["model"])
    model.to(device, memory_format=torch.channels_last if params.channels_last else torch.contiguous_format)
    loader = make_loaders(rows, crops_root, params, device)[split]
    return validate(model, loader, device, amp=params.amp, channels_last=params.channels_last)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _better(metrics: Mapping[str, float], best: Mapping[str, float]) -> bool:
    """A higher val top-1, or the same with a lower val loss: on a small val set top-1 saturates early, and
    the reference's strict ``>`` would keep the first epoch that reached it."""
    return (metrics["val/acc_top1"], -metrics["val/loss"]) > (best["val/acc_top1"], -best["val/loss"])


def _wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``model`` when running under torchrun; the parameters to sync are those that train now."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def fit(model: nn.Module, loaders: Mapping[str, DataLoader], params: TrainingParams, checkpoints: Checkpoints,
        device: torch.device, *, resume: bool = True,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        progress: Callable[[str], None] | None = None) -> FitResult:
    """Train for up to ``params.epochs`` epochs, validating after each and keeping the best on val top-1 (ties: lower val loss);
    stop when it has not improved for ``params.patience`` epochs. After every epoch the whole state (model,
    optimizer, scheduler, scaler, RNG, history) is saved atomically to ``last.pt``, and ``best.pt`` when it
    improved; with ``resume`` an existing ``last.pt`` is continued from the next epoch, so a killed run ends
    with the weights an uninterrupted one would have (same seed, same device). Under DDP only rank 0 writes
    and reports; metrics are summed over ranks."""
    started = time.perf_counter()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    optimizer, scheduler = make_optimizer(model, params, device)
    scaler = torch.amp.GradScaler(device.type, enabled=params.amp and device.type == "cuda"
                                  and not torch.cuda.is_bf16_supported())
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {}
    start_epoch, resumed_from = 0, None
    last = checkpoints.load(LAST, warn=progress) if resume else None
    if last is not None:
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        scaler.load_state_dict(last["scaler"])
        _restore_rng(last["rng"], device)
        history, start_epoch, resumed_from = list(last["history"]), last["epoch"] + 1, last["epoch"]
        best = checkpoints.load(BEST, warn=progress) or {}
        if last.get("stopped"):
            start_epoch = params.epochs
    else:
        torch.manual_seed(params.seed)  # augmentation draws: the same seed, the same run
    best_epoch = best.get("epoch", -1)
    stopped = bool(last and last.get("stopped"))
    set_finetune(model, start_epoch < params.finetune)
    trained = _wrap(model, device)
    for epoch in range(start_epoch, params.epochs):
        if epoch == params.finetune and epoch > 0:
            set_finetune(model, False)
            trained = _wrap(model, device)
        loader = loaders["train"]
        loader.sampler.set_epoch(epoch)
        lr = scheduler.get_last_lr()[0]

        def report(step: int, batches: int, so_far: dict[str, float]) -> None:
            if rank0 and progress is not None:
                progress(f"epoch {epoch + 1}/{params.epochs} batch {step}/{batches}: loss {so_far['loss']:.4f}, "
                         f"{so_far['crops_per_s']:.1f} crops/s")

        train = train_one_epoch(trained, loader, optimizer, scaler, device, amp=params.amp,
                                channels_last=params.channels_last, head_only=epoch < params.finetune,
                                progress=report, progress_every=params.progress_every)
        val = validate(model, loaders["val"], device, amp=params.amp, channels_last=params.channels_last) \
            if "val" in loaders else train
        scheduler.step()
        metrics = {"epoch": epoch, "lr": lr, **{f"train/{k}": v for k, v in train.items()},
                   **{f"val/{k}": v for k, v in val.items()}}
        history.append(metrics)
        improved = best_epoch < 0 or _better(metrics, history[[m["epoch"] for m in history].index(best_epoch)])
        state = {"epoch": epoch, "model": unwrap(model).state_dict(), "val/acc": 100 * metrics["val/acc_top1"],
                 "optimizer": optimizer.state_dict()}
        if improved:  # a copy: state_dict() tensors are the live, still-training weights
            best, best_epoch = copy.deepcopy(state), epoch
        stopped = epoch >= best_epoch + params.patience
        if rank0:
            if improved:
                checkpoints.save(BEST, state)
            checkpoints.save(LAST, {**state, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                    "rng": _rng_state(device), "history": history, "stopped": stopped,
                                    "best_epoch": best_epoch, "params": asdict(params)})
            if on_epoch is not None:
                on_epoch({**metrics, "best_epoch": best_epoch})
        if stopped:
            break
    if not best:
        raise RuntimeError("training ran no epoch: epochs must be at least 1")
    return FitResult(best=best, history=history, stopped_early=stopped, resumed_from_epoch=resumed_from,
                     seconds=time.perf_counter() - started)
