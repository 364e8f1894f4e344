"""Training a species classifier on crops: data loading as the reference ``train_classifier.py`` (its
transforms, label weighting, detection-confidence weights), one epoch of training and one of validation as
plain functions returning metric dicts, and ``fit``: the loop with early stopping, atomic per-epoch
checkpoints and resume. Runs in one process or under ``torchrun`` (DDP): rank 0 writes and reports.

Accuracies are fractions (0–1) everywhere except the checkpoint's ``"val/acc"``, which keeps the reference's
percentage so reference tools read it unchanged.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Sampler

from animl_assets.core.ml.data import CropDataset, batch_mix, eval_transform, resolve_device, train_transform
from animl_assets.core.ml.frames import SPLITS, output_index_column, top_ks
from animl_assets.core.ml.models import (
    MultiHead,
    build_model,
    checkpoint_weights,
    head,
    head_parameters,
    model_from_checkpoint,
    set_finetune,
    unwrap,
)
from animl_assets.core.ml.recipe import BEST, EFFICIENTNETS, LAST, LITE0, Checkpoints, FitResult, TrainingParams


def init_model(params: TrainingParams, num_classes: int, pretrained: bool | str | Mapping[str, Any] = False
               ) -> nn.Module:
    """The model to train, its new layers initialised from ``params.seed``: with extra ``params.outputs`` a
    ``MultiHead``, whose heads start from the initial checkpoint's where it has them at the same size."""
    torch.manual_seed(params.seed)
    model = build_model(params.model_name, num_classes, pretrained=pretrained, finetune=params.finetune > 0,
                        image_size=params.image_size)
    if not params.outputs:
        return model
    multi = MultiHead(model, params.outputs)
    kept = pretrained.get("heads", {}) if isinstance(pretrained, Mapping) else {}
    own = multi.heads.state_dict()
    multi.heads.load_state_dict({k: v for k, v in kept.items() if k in own and own[k].shape == v.shape}, strict=False)
    set_finetune(multi, params.finetune > 0)
    return multi


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
        labels = rows[["label_index", *map(output_index_column, params.outputs)]].to_numpy()
        dataset = CropDataset(crops_root, rows["path"], labels if params.outputs else labels[:, 0], rows["weight"],
                              train_transform(params.preprocessing, params.augment if params.modern else "reference")
                              if train else eval_transform(params.preprocessing))
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


class OutputLoss:
    """The extra outputs' part of a multi-output model's loss: each head's cross-entropy (class-balanced where
    ``class_weights`` give weights; a missing label, -1, left out) times its weight, summed per crop; and the
    running sums of their per-epoch loss and top-1 (``count``, ``loss``, ``hits`` per output)."""

    def __init__(self, num_species: int, sizes: Mapping[str, int], weights: Mapping[str, float],
                 class_weights: Mapping[str, torch.Tensor] | None = None) -> None:
        self.names, self.weights = list(sizes), {name: float(weights.get(name, 1.0)) for name in sizes}
        ends = torch.tensor([num_species, *sizes.values()]).cumsum(0).tolist()
        self.columns = dict(zip(self.names, zip(ends[:-1], ends[1:])))
        self.class_weights = dict(class_weights or {})

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(len(logits), device=logits.device)
        for number, name in enumerate(self.names, start=1):
            start, end = self.columns[name]
            weight = self.class_weights.get(name)
            total = total + self.weights[name] * nn.functional.cross_entropy(
                logits[:, start:end], labels[:, number], reduction="none", ignore_index=-1,
                weight=None if weight is None else weight.to(logits.device))
        return total

    def sums(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(len(self.names), 3, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, sums: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        for number, name in enumerate(self.names, start=1):
            start, end = self.columns[name]
            y, known = labels[:, number], labels[:, number] >= 0
            if known.any():
                part = logits[known, start:end].float()
                loss = nn.functional.cross_entropy(part, y[known], reduction="sum")
                hits = (part.argmax(dim=1) == y[known]).sum()
                sums[number - 1] += torch.stack([known.sum().double(), loss.double(), hits.double()])

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        sums = sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        found = {}
        for name, (count, loss, hits) in zip(self.names, sums.tolist()):
            found |= {f"{name}/count": count, f"{name}/loss": loss / max(count, 1.0),
                      f"{name}/acc_top1": hits / max(count, 1.0)}
        return found


def output_loss(frame: pd.DataFrame, params: TrainingParams, num_species: int) -> OutputLoss | None:
    """The extra outputs' loss of a training (None without extra outputs); with ``label_weighted`` each output's
    classes are weighted by their inverse frequency among the train crops that have a value."""
    if not params.outputs:
        return None
    train, class_weights = frame[frame["split"] == "train"], {}
    for name, size in params.outputs.items():
        values = train[output_index_column(name)]
        counts = torch.bincount(torch.tensor(values[values >= 0].to_numpy(), dtype=torch.long), minlength=size).double()
        if params.label_weighted and counts.sum() > 0:
            present = counts > 0
            class_weights[name] = torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)),
                                              torch.zeros_like(counts)).float()
    return OutputLoss(num_species, params.outputs, params.output_weights, class_weights)


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=amp and device.type == "cuda")


def _batches(loader: DataLoader, device: torch.device, channels_last: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels, weights, _ in loader:
        yield (images.to(device, non_blocking=True, memory_format=memory_format),
               labels.to(device, non_blocking=True), weights.to(device, non_blocking=True))


@dataclass
class StepRecipe:
    """What each training step does besides forward, backward and the optimizer step: label smoothing, batch
    MixUp/CutMix, gradient clipping, and ``after_step`` (a per-batch LR schedule, the EMA update)."""

    label_smoothing: float = 0.0
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    grad_clip: float = 0.0
    after_step: Callable[[], None] | None = None


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, device: torch.device, *, amp: bool = True,
                    channels_last: bool = False, head_only: bool = False, step: StepRecipe = StepRecipe(),
                    progress: Callable[[int, int, dict[str, float]], None] | None = None,
                    progress_every: int = 50, outputs: OutputLoss | None = None) -> dict[str, float]:
    """One pass over ``loader`` updating ``model``; loss is unweighted (the sampler balances labels, as the
    reference), plus the extra ``outputs``' loss of a multi-output model. ``head_only``: BN and dropout stay in
    eval mode (the reference's fine-tune). Accuracy counts the unmixed labels. Returns the epoch's metrics
    (each extra output's as ``<output>/...``) and ``crops_per_s``."""
    model.train(not head_only)
    loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=step.label_smoothing)
    species = head(model).out_features
    totals = Totals(species, device)
    output_sums = outputs.sums(device) if outputs is not None else None
    started, batches = time.perf_counter(), len(loader)
    for number, (images, all_labels, weights) in enumerate(_batches(loader, device, channels_last), start=1):
        labels = all_labels[:, 0] if all_labels.ndim > 1 else all_labels
        images, targets = step.mix(images, labels) if step.mix is not None else (images, labels)
        with _autocast(device, amp):
            all_logits = model(images)
            logits = all_logits[:, :species]
            losses = loss_fn(logits.float(), targets)
            if outputs is not None:
                losses = losses + outputs(all_logits.float(), all_labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses.mean()).backward()
        if step.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), step.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if step.after_step is not None:
            step.after_step()
        totals.add(logits.detach(), labels, weights, losses.detach())
        if outputs is not None:
            outputs.add(output_sums, all_logits.detach(), all_labels)
        if progress is not None and progress_every and number % progress_every == 0 and number < batches:
            done = totals.sums[0].item()
            progress(number, batches, {"loss": totals.sums[1].item() / done,
                                       "crops_per_s": done / (time.perf_counter() - started)})
    metrics = totals.metrics() | (outputs.metrics(output_sums) if outputs is not None else {})
    metrics["crops_per_s"] = metrics["count"] / (time.perf_counter() - started)
    return metrics


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, device: torch.device, *, amp: bool = True,
             channels_last: bool = False, outputs: OutputLoss | None = None) -> dict[str, float]:
    """Loss and top-k accuracy of ``model`` over ``loader``, plain and sample-weighted, with ``crops_per_s``;
    a multi-output model's extra ``outputs`` as ``<output>/loss`` and ``<output>/acc_top1``."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    species = head(model).out_features
    totals = Totals(species, device)
    output_sums = outputs.sums(device) if outputs is not None else None
    started = time.perf_counter()
    for images, all_labels, weights in _batches(loader, device, channels_last):
        labels = all_labels[:, 0] if all_labels.ndim > 1 else all_labels
        with _autocast(device, amp):
            all_logits = model(images).float()
        logits = all_logits[:, :species]
        totals.add(logits, labels, weights, loss_fn(logits, labels))
        if outputs is not None:
            outputs.add(output_sums, all_logits, all_labels)
    metrics = totals.metrics() | (outputs.metrics(output_sums) if outputs is not None else {})
    metrics["crops_per_s"] = metrics["count"] / (time.perf_counter() - started)
    return metrics


def make_optimizer(model: nn.Module, params: TrainingParams, device: torch.device, steps_per_epoch: int = 1,
                   pretrained_body: bool = False) -> tuple[torch.optim.Optimizer, LRScheduler, bool]:
    """The optimizer, its LR schedule and whether that schedule steps per batch (else per epoch).

    ``reference``: EfficientNets RMSprop (alpha 0.9, momentum 0.9) with the LR decaying 0.97 every 2.4 epochs;
    ResNets SGD (momentum 0.9), LR ÷10 every 8 epochs. ``modern``: AdamW (no decay on norms and biases), the
    head at ``lr`` and a pretrained body at ``lr * body_lr_scale``, each warmed up linearly over
    ``warmup_epochs`` from when it starts training (the body after the ``finetune`` head-only epochs), then
    cosine decay to 1% by the last epoch. Fused kernels where the device has them."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    lr = params.learning_rate
    if params.modern:
        head_ids = {id(p) for p in head_parameters(model)}
        body_lr = lr * (params.body_lr_scale if pretrained_body else 1.0)
        groups = [{"params": [p for p in model.parameters()
                              if (id(p) in head_ids) == is_head and (p.ndim > 1) == decays],
                   "lr": lr if is_head else body_lr, "weight_decay": params.decay if decays else 0.0,
                   "start": 0 if is_head else params.finetune * steps_per_epoch}
                  for is_head in (False, True) for decays in (True, False)]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr, **fast)
        total, warmup = params.epochs * steps_per_epoch, max(1, round(params.warmup_epochs * steps_per_epoch))
        factors = [warmup_cosine(g["start"], warmup, total) for g in optimizer.param_groups]
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors), True
    if params.model_name in EFFICIENTNETS or params.model_name == LITE0:
        optimizer = torch.optim.RMSprop(model.parameters(), lr, alpha=0.9, momentum=0.9,
                                        weight_decay=params.decay, foreach=True)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.97 ** (1 / 2.4)), False
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=params.decay, **fast)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=8, gamma=0.1), False


def warmup_cosine(start: int, warmup: int, total: int, floor: float = 0.01) -> Callable[[int], float]:
    """The LR factor at each step for a group that starts training at step ``start``: 0 before it, linear
    warm-up over ``warmup`` steps, then cosine decay to ``floor`` at step ``total``."""
    def factor(step: int) -> float:
        if step < start:
            return 0.0
        if step - start < warmup:
            return (step - start + 1) / warmup
        progress = min(1.0, (step - start - warmup) / max(1, total - start - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def weights_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and buffers (torch's ``AveragedModel``), whose
    decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates so that short trainings (a few
    hundred steps) average their recent weights rather than their initial ones."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        n = float(updates)
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(averaged, current, updates)
    return AveragedModel(unwrap(model), multi_avg_fn=update, use_buffers=True)


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
    return fit(model, loaders, params, checkpoints, device, resume=resume, pretrained_body=init is not False,
               on_epoch=on_epoch, progress=progress, outputs=output_loss(frame, params, num_classes))


def evaluate_checkpoint(checkpoint: Mapping[str, Any], frame: pd.DataFrame, crops_root: str | Path,
                        num_classes: int, params: TrainingParams, split: str = "test") -> dict[str, float]:
    """Metrics of a checkpoint's model on one split (eval transform), in this process."""
    rows = frame[frame["split"] == split]
    if rows.empty:
        return {}
    device = resolve_device(params.device)
    model = model_from_checkpoint(checkpoint, params.model_name, num_classes, params.image_size)
    model.to(device, memory_format=torch.channels_last if params.channels_last else torch.contiguous_format)
    loader = make_loaders(rows, crops_root, params, device)[split]
    return validate(model, loader, device, amp=params.amp, channels_last=params.channels_last,
                    outputs=output_loss(frame, params, num_classes))


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _score(metrics: Mapping[str, float], prefix: str = "val", output: str = "species") -> tuple[float, float]:
    """A higher val top-1, or the same with a lower val loss: on a small val set top-1 saturates early, and
    the reference's strict ``>`` would keep the first epoch that reached it. ``output``: the species head's,
    or an extra output's."""
    name = prefix if output == "species" else f"{prefix}/{output}"
    return metrics[f"{name}/acc_top1"], -metrics[f"{name}/loss"]


def _ema_better(metrics: Mapping[str, float], output: str = "species") -> bool:
    """Whether an epoch's EMA validated better than its raw weights (False when it was not validated)."""
    return "val_ema/loss" in metrics and _score(metrics, "val_ema", output) > _score(metrics, "val", output)


def _epoch_score(metrics: Mapping[str, float], output: str = "species") -> tuple[float, float]:
    """An epoch's score: that of its raw weights or of their EMA, whichever is better."""
    return _score(metrics, "val_ema" if _ema_better(metrics, output) else "val", output)


def _wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``model`` when running under torchrun; the parameters to sync are those that train now."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def fit(model: nn.Module, loaders: Mapping[str, DataLoader], params: TrainingParams, checkpoints: Checkpoints,
        device: torch.device, *, resume: bool = True, pretrained_body: bool = False,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        progress: Callable[[str], None] | None = None, outputs: OutputLoss | None = None) -> FitResult:
    """Train for up to ``params.epochs`` epochs, validating after each and keeping the best on val top-1 (ties:
    lower val loss); stop when it has not improved for ``params.patience`` epochs. With an EMA (``modern``)
    both the raw weights and their average are validated (``val/`` and ``val_ema/``) and the better is the
    epoch's model: ``best.pt`` keeps it as ``model`` (``weights``: raw or ema). After every epoch the whole
    state (model, EMA, optimizer, scheduler, scaler, RNG, history) is saved atomically to ``last.pt``, and
    ``best.pt`` when it improved; with ``resume`` an existing ``last.pt`` is continued from the next epoch, so
    a killed run ends with the weights an uninterrupted one would have (same seed, same device). Under DDP
    only rank 0 writes and reports; metrics are summed over ranks. ``pretrained_body``: the body starts from
    trained weights (it learns at ``body_lr_scale`` of the head's rate). A multi-output model trains its extra
    ``outputs`` too; ``params.early_stopping_output`` picks the output whose val score keeps the best epoch."""
    started = time.perf_counter()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    model.to(device, memory_format=torch.channels_last if params.channels_last else torch.contiguous_format)
    optimizer, scheduler, per_batch = make_optimizer(model, params, device, len(loaders["train"]), pretrained_body)
    scaler = torch.amp.GradScaler(device.type, enabled=params.amp and device.type == "cuda"
                                  and not torch.cuda.is_bf16_supported())
    ema = weights_ema(model, params.ema_decay) if params.ema else None
    last = checkpoints.load(LAST, warn=progress) if resume else None
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "ema": ema}
    history, best, start_epoch = _restore(last, parts, checkpoints, device, params, progress)
    resumed_from = None if last is None else last["epoch"]
    best_epoch = best.get("epoch", -1)
    stopped = bool(last and last.get("stopped"))
    set_finetune(model, start_epoch < params.finetune)
    trained = _wrap(model, device)
    step = _step_recipe(params, head(model).out_features, scheduler if per_batch else None, ema, model)
    for epoch in range(start_epoch, params.epochs):
        if epoch == params.finetune and epoch > 0:
            set_finetune(model, False)
            trained = _wrap(model, device)
        loader = loaders["train"]
        loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[-1]["lr"]

        def report(number: int, batches: int, so_far: dict[str, float]) -> None:
            if rank0 and progress is not None:
                progress(f"epoch {epoch + 1}/{params.epochs} batch {number}/{batches}: loss {so_far['loss']:.4f}, "
                         f"{so_far['crops_per_s']:.1f} crops/s")

        train = train_one_epoch(trained, loader, optimizer, scaler, device, amp=params.amp,
                                channels_last=params.channels_last, head_only=epoch < params.finetune, step=step,
                                progress=report, progress_every=params.progress_every, outputs=outputs)
        metrics = {"epoch": epoch, "lr": lr, **{f"train/{k}": v for k, v in train.items()},
                   **_validation(model, ema, loaders, device, params, train, outputs)}
        if not per_batch:
            scheduler.step()
        history.append(metrics)
        best_metrics = next((m for m in history if m["epoch"] == best_epoch), None)
        output = params.early_stopping_output
        improved = best_metrics is None or _epoch_score(metrics, output) > _epoch_score(best_metrics, output)
        state = {"epoch": epoch, "val/acc": 100 * _epoch_score(metrics)[0], **_weights(model, ema, metrics, output),
                 "optimizer": optimizer.state_dict()}
        if improved:  # a copy: state_dict() tensors are the live, still-training weights
            best, best_epoch = copy.deepcopy(state), epoch
        stopped = epoch >= best_epoch + params.patience
        if rank0:
            if improved:
                checkpoints.save(BEST, state)
            checkpoints.save(LAST, {**state, "model": unwrap(model).state_dict(), "scheduler": scheduler.state_dict(),
                                    "scaler": scaler.state_dict(), "rng": _rng_state(device), "history": history,
                                    "stopped": stopped, "best_epoch": best_epoch, "params": asdict(params),
                                    **({"ema": ema.state_dict()} if ema is not None else {})})
            if on_epoch is not None:
                on_epoch({**metrics, "best_epoch": best_epoch})
        if stopped:
            break
    if not best:
        raise RuntimeError("training ran no epoch: epochs must be at least 1")
    return FitResult(best=best, history=history, stopped_early=stopped, resumed_from_epoch=resumed_from,
                     seconds=time.perf_counter() - started)


def _restore(last: Mapping[str, Any] | None, parts: Mapping[str, Any], checkpoints: Checkpoints,
             device: torch.device, params: TrainingParams, progress: Callable[[str], None] | None
             ) -> tuple[list[dict[str, float]], dict[str, Any], int]:
    """Load ``last.pt`` into the training's parts (model, optimizer, scheduler, scaler, EMA) and the RNG, or
    seed a new run; returns the history so far, the best checkpoint and the epoch to start at."""
    if last is None:
        torch.manual_seed(params.seed)  # augmentation draws: the same seed, the same run
        return [], {}, 0
    for name, part in parts.items():
        if part is not None:
            part.load_state_dict(last[name])
    _restore_rng(last["rng"], device)
    best = checkpoints.load(BEST, warn=progress) or {}
    return list(last["history"]), best, params.epochs if last.get("stopped") else last["epoch"] + 1


def _step_recipe(params: TrainingParams, num_classes: int, scheduler: LRScheduler | None,
                 ema: AveragedModel | None, model: nn.Module) -> StepRecipe:
    """What each step does under ``params.recipe``: the reference's plain steps, or the modern recipe's."""
    if not params.modern:
        return StepRecipe()

    def after_step() -> None:
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))

    return StepRecipe(label_smoothing=params.label_smoothing, grad_clip=params.grad_clip, after_step=after_step,
                      mix=batch_mix(num_classes, params.mixup_alpha, params.cutmix_alpha))


def _validation(model: nn.Module, ema: AveragedModel | None, loaders: Mapping[str, DataLoader],
                device: torch.device, params: TrainingParams, train: Mapping[str, float],
                outputs: OutputLoss | None = None) -> dict[str, float]:
    """``val/`` metrics of the raw weights and ``val_ema/`` of their EMA (the train metrics without val)."""
    if "val" not in loaders:
        return {f"val/{k}": v for k, v in train.items()}
    run = functools.partial(validate, loader=loaders["val"], device=device, amp=params.amp,
                            channels_last=params.channels_last, outputs=outputs)
    metrics = {f"val/{k}": v for k, v in run(model).items()}
    if ema is not None:
        metrics |= {f"val_ema/{k}": v for k, v in run(ema.module).items()}
    return metrics


def _weights(model: nn.Module, ema: AveragedModel | None, metrics: Mapping[str, float],
             output: str = "species") -> dict[str, Any]:
    """An epoch's model for ``best.pt``: the raw weights, or their EMA when it validated better (``weights``
    says which; one copy, so ``best.pt`` stays the reference's size). ``checkpoint_weights``' layout: the
    species classifier as ``model``, a multi-output model's extra heads beside it."""
    if ema is None:
        return checkpoint_weights(model)
    if _ema_better(metrics, output):
        return {**checkpoint_weights(ema.module), "weights": "ema"}
    return {**checkpoint_weights(model), "weights": "raw"}
