"""Evaluating a classifier, in the reference ``evaluate_model.py``'s formats, with scikit-learn's metrics.

Per split: ``outputs_{split}.csv.gz`` (``path,label,weight,<one column per label>``: softmax
probabilities), a row of ``overall_metrics.csv`` (loss and top-1/top-3 accuracy, plain and weighted, in
percent as the reference writes them), a confusion matrix, and ``label_stats.csv`` rows (precision and
recall; recall is empty for a label without crops, as in the reference). Beyond the reference: F1 and
macro averages, per-label confidence thresholds for a target precision, models on other label sets
through a target mapping, and two labels (where the reference's top-3 crashes) or no label weighting
(where its loader crashes).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import DataLoader

from animl_assets.core.artifact_files import Arrays, Blob
from animl_assets.core.ml import drift, open_set
from animl_assets.core.ml.data import CropDataset, eval_transform
from animl_assets.core.ml.frames import SPLITS, Preprocessing, output_index_column, top_ks
from animl_assets.core.ml.labels import label_names, target_columns
from animl_assets.core.ml.models import MultiHead
from animl_assets.core.ml.portable import (
    OnnxModel,
    export_program,
    load_program,
    max_difference,
    onnx_bytes,
    program_bytes,
)
from animl_assets.core.ml.recipe import Evaluation

OVERALL_COLUMNS = ("split", "loss", "acc_top1", "acc_top3", "loss_weighted", "acc_weighted_top1",
                   "acc_weighted_top3")
LABEL_STATS_COLUMNS = ("split", "label", "precision", "recall")
MACRO = "(macro)"


# ---- mapping another model's labels onto ours --------------------------------------------------------------

def map_logits(logits: torch.Tensor, columns: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits over the targets: log-sum-exp of each target's columns, so that the softmax of the result is
    the sum of the mapped probabilities (an empty target gets probability 0)."""
    out = torch.full((logits.shape[0], len(columns)), -math.inf, dtype=logits.dtype, device=logits.device)
    for target, cols in enumerate(columns):
        if cols:
            out[:, target] = torch.logsumexp(logits[:, list(cols)], dim=1)
    return out


# ---- running a model --------------------------------------------------------------------------------------

def eval_loader(paths: Sequence[str], labels: Sequence[int], weights: Sequence[float], crops_root: str | Path,
                prep: Preprocessing, batch_size: int = 64, num_workers: int = 0) -> DataLoader:
    """The crops in order, through the evaluation transform (resize, centre crop, the model's normalization)."""
    dataset = CropDataset(crops_root, paths, labels, weights, eval_transform(prep))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=False)


@torch.no_grad()
def predict_logits(model: nn.Module | torch.jit.ScriptModule, loader: DataLoader, device: torch.device,
                   columns: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """The model's logits for every crop of ``loader`` (in order, float64), mapped onto targets when
    ``columns`` is given."""
    model.eval().to(device)
    batches = []
    for images, *_ in loader:
        logits = model(images.to(device)).float()
        batches.append((map_logits(logits, columns) if columns is not None else logits).double().cpu())
    return torch.cat(batches).numpy() if batches else np.zeros((0, len(columns or ())))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (rows of -inf logits get probability 0)."""
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


# ---- metrics ---------------------------------------------------------------------------------------------

def outputs_frame(paths: Sequence[str], labels: Sequence[str], weights: Sequence[float], probs: np.ndarray,
                  names: Sequence[str]) -> pd.DataFrame:
    """``outputs_{split}.csv``: ``path,label,weight`` and one probability column per label."""
    frame = pd.DataFrame({"path": list(paths), "label": list(labels), "weight": np.asarray(weights, dtype=float)})
    return pd.concat([frame, pd.DataFrame(probs.astype(np.float32), columns=list(names))], axis=1)


def _arrays(outputs: pd.DataFrame, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    probs = outputs[list(names)].to_numpy(dtype=np.float64)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(outputs["label"]) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the model's outputs")
    return outputs["label"].map(index).to_numpy(dtype=int), probs, outputs["weight"].to_numpy(dtype=float)


def _hits(y: np.ndarray, probs: np.ndarray, k: int, weights: np.ndarray | None) -> float:
    labels = np.arange(probs.shape[1])
    if k >= len(labels):
        return float(len(y) if weights is None else weights.sum())
    score = probs[:, 1] if len(labels) == 2 else probs  # scikit-learn's binary form
    return float(skm.top_k_accuracy_score(y, score, k=k, labels=labels, normalize=False, sample_weight=weights))


def overall_metrics(outputs: pd.DataFrame, names: Sequence[str]) -> dict[str, float]:
    """One ``overall_metrics.csv`` row: mean cross-entropy and top-1/top-3 accuracy (percent), and their
    weighted versions, which (as in the reference) divide the weighted sums by the number of crops."""
    y, probs, weights = _arrays(outputs, names)
    n = len(y)
    if n == 0:
        return {column: math.nan for column in OVERALL_COLUMNS[1:]}
    labels = np.arange(len(names))
    clipped = np.clip(probs, 1e-15, 1)
    clipped /= clipped.sum(axis=1, keepdims=True)
    k1, k3 = top_ks(len(names))
    return {
        "loss": float(skm.log_loss(y, clipped, labels=labels)),
        "acc_top1": 100 * _hits(y, probs, k1, None) / n,
        "acc_top3": 100 * _hits(y, probs, k3, None) / n,
        "loss_weighted": float(skm.log_loss(y, clipped, labels=labels, sample_weight=weights, normalize=False)) / n,
        "acc_weighted_top1": 100 * _hits(y, probs, k1, weights) / n,
        "acc_weighted_top3": 100 * _hits(y, probs, k3, weights) / n,
    }


def confusion(outputs: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """C[i, j]: crops of label i predicted as label j."""
    y, probs, _ = _arrays(outputs, names)
    return skm.confusion_matrix(y, probs.argmax(axis=1), labels=np.arange(len(names)))


def label_stats(outputs: pd.DataFrame, names: Sequence[str], split: str) -> pd.DataFrame:
    """``label_stats.csv`` rows: precision (0 for a label never predicted) and recall (empty for a label
    without crops), as the reference."""
    y, probs, _ = _arrays(outputs, names)
    pred, labels = probs.argmax(axis=1), np.arange(len(names))
    return pd.DataFrame({
        "split": split, "label": list(names),
        "precision": skm.precision_score(y, pred, labels=labels, average=None, zero_division=0),
        "recall": skm.recall_score(y, pred, labels=labels, average=None, zero_division=np.nan),
    })


def label_report(outputs: pd.DataFrame, names: Sequence[str], split: str) -> pd.DataFrame:
    """Per-label precision, recall, F1 and support, and their macro averages (label ``(macro)``) over the
    labels that are defined (a label without crops or predictions does not count)."""
    y, probs, _ = _arrays(outputs, names)
    pred, labels = probs.argmax(axis=1), np.arange(len(names))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=labels, average=None, zero_division=np.nan)
    rows = pd.DataFrame({"split": split, "label": list(names), "precision": precision, "recall": recall,
                         "f1": f1, "support": support.astype(int)})
    macro = skm.precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=np.nan)
    rows.loc[len(rows)] = [split, MACRO, *macro[:3], int(support.sum())]
    return rows


def binary_auroc(outputs: pd.DataFrame, names: Sequence[str]) -> float:
    """A two-label model's ROC AUC for its second label (e.g. ``not_empty``) against the first; NaN for other
    models or a split with one label only."""
    if len(names) != 2 or outputs["label"].nunique() != 2:
        return float("nan")
    return float(skm.roc_auc_score(outputs["label"] == names[1], outputs[names[1]]))


def macro_recall(outputs: pd.DataFrame, names: Sequence[str]) -> float:
    """Mean recall over the labels with crops in ``outputs`` (scikit-learn's balanced accuracy)."""
    y, probs, _ = _arrays(outputs, names)
    return float(skm.recall_score(y, probs.argmax(axis=1), labels=np.unique(y), average="macro", zero_division=0))


# ---- per-label thresholds --------------------------------------------------------------------------------

def thresholds(outputs: pd.DataFrame, names: Sequence[str], target_precision: float = 0.95) -> dict[str, Any]:
    """For each label, the lowest confidence at which accepting the model's top-1 prediction of that label
    reaches ``target_precision`` on these outputs (the validation split), with the precision and recall
    left there; ``threshold`` is None when no confidence reaches it."""
    y, probs, _ = _arrays(outputs, names)
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    per_label = {}
    for i, name in enumerate(names):
        positives = int((y == i).sum())
        score = np.where(pred == i, conf, 0.0)  # confidence of an accepted prediction of this label
        entry: dict[str, Any] = {"threshold": None, "precision": None, "recall": None, "support": positives}
        if positives and (pred == i).any():
            precision, recall, cuts = skm.precision_recall_curve(y == i, score)
            ok = [j for j in range(len(cuts)) if cuts[j] > 0 and precision[j] >= target_precision]
            if ok:
                j = ok[0]  # cuts ascend: the first is the lowest
                entry.update(threshold=float(cuts[j]), precision=float(precision[j]), recall=float(recall[j]))
        per_label[name] = entry
    return {"target_precision": target_precision, "split": "val", "labels": per_label}


def thresholds_table(found: Mapping[str, Any]) -> pd.DataFrame:
    """``thresholds.json`` as rows: label, threshold, precision and recall there."""
    return pd.DataFrame([{"label": name, **{k: entry[k] for k in ("threshold", "precision", "recall")}}
                         for name, entry in found["labels"].items()])


# ---- TorchScript ------------------------------------------------------------------------------------------

def compile_model(model: nn.Module, image_size: int) -> torch.jit.ScriptModule:
    """The model traced with TorchScript on CPU (as the reference: tracing, since EfficientNet does not
    script), a standalone file that needs neither this package nor efficientnet-pytorch."""
    model = model.eval().to("cpu")
    with torch.no_grad():
        return torch.jit.trace(model, torch.rand(1, 3, image_size, image_size))


def script_bytes(scripted: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def load_script(data: bytes, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    return torch.jit.load(io.BytesIO(data), map_location=device)


# ---- the whole evaluation ---------------------------------------------------------------------------------

def summarize(outputs: Mapping[str, pd.DataFrame], names: Sequence[str]
              ) -> tuple[pd.DataFrame, Arrays, pd.DataFrame, pd.DataFrame]:
    """``overall_metrics``, confusion matrices, ``label_stats`` and the label report over the splits' outputs."""
    overall = pd.DataFrame([{"split": s, **overall_metrics(o, names)} for s, o in outputs.items()],
                           columns=list(OVERALL_COLUMNS))
    cms = Arrays({s: confusion(o, names) for s, o in outputs.items()})
    stats = pd.concat([label_stats(o, names, s) for s, o in outputs.items()], ignore_index=True)
    report = pd.concat([label_report(o, names, s) for s, o in outputs.items()], ignore_index=True)
    return overall, cms, stats[list(LABEL_STATS_COLUMNS)], report


def evaluate(model: nn.Module, frame: pd.DataFrame, crops_root: str | Path, label_index: Mapping[str, str],
             prep: Preprocessing, device: torch.device, *, target_precision: float = 0.95, batch_size: int = 64,
             num_workers: int = 0, parity_tolerance: float = 1e-4, portable: bool = True,
             params: Mapping[str, Any] | None = None, progress: Callable[[str], None] | None = None,
             unknown_score: str = open_set.DEFAULT_SCORE, unknown_recall: float = 0.95
             ) -> tuple[Evaluation, dict[str, float]]:
    """Evaluate ``model`` (its best checkpoint loaded) on every split of ``frame`` (``split_frame``'s rows:
    path, label, label_index, weight, split), fit the unknowns' threshold on val (``unknown_score`` at
    ``unknown_recall`` of its crops) and profile the test predictions for drift, compile it with TorchScript
    and, with ``portable``, export it with ``torch.export`` and to ONNX; each must give the eager model's
    outputs on a batch of the crops (ValueError past ``parity_tolerance``). Returns the evaluation and each
    form's largest difference."""
    names = label_names(label_index)
    outputs, logits = {}, {}
    for split in SPLITS:
        rows = frame[frame["split"] == split]
        loader = eval_loader(rows["path"], rows["label_index"], rows["weight"], crops_root, prep,
                             batch_size, num_workers)
        logits[split] = predict_logits(model, loader, device) if len(rows) else np.zeros((0, len(names)))
        outputs[split] = outputs_frame(rows["path"], rows["label"], rows["weight"], softmax(logits[split]), names)
        if progress:
            progress(f"evaluated {len(rows)} {split} crops")
    unknowns = open_set.fit(logits["val"], unknown_score, unknown_recall)
    test_profile = drift.profile(outputs["test"][names].to_numpy(), open_set.is_unknown(logits["test"], unknowns),
                                 names)
    overall, cms, stats, report = summarize(outputs, names)
    found = thresholds(outputs["val"], names, target_precision)
    at_threshold = thresholds_table(found).rename(columns={"precision": "precision_at_threshold",
                                                           "recall": "recall_at_threshold"})
    report = report.merge(at_threshold, on="label", how="left")
    sample = frame.head(min(len(frame), 8))
    batch = next(iter(eval_loader(sample["path"], sample["label_index"], sample["weight"], crops_root, prep,
                                  len(sample))))[0]
    forms, gaps = compiled_forms(model, prep.image_size, portable), {}
    for form, (_, runnable) in forms.items():
        gaps[form] = max_difference(model, runnable, batch)
        if gaps[form] > parity_tolerance:
            raise ValueError(f"the {form} model's outputs differ from the eager model's by {gaps[form]:.2e} "
                             f"(tolerance {parity_tolerance:.0e})")
    files = {form: Blob(data) for form, (data, _) in forms.items()}
    return Evaluation(outputs["train"], outputs["val"], outputs["test"], overall, cms, stats, report, found,
                      dict(label_index), files["torchscript"], files.get("onnx", Blob(b"")),
                      files.get("torch_export", Blob(b"")), dict(params or {}), unknowns, test_profile), gaps


def evaluate_outputs(model: MultiHead, frame: pd.DataFrame, crops_root: str | Path,
                     output_index: Mapping[str, Mapping[str, str]], prep: Preprocessing, device: torch.device, *,
                     batch_size: int = 64, num_workers: int = 0) -> tuple[dict[str, Any], pd.DataFrame]:
    """The reference's evaluation files for each extra output of a multi-output model, over the crops that
    have its value: ``outputs_{split}_<output>.csv.gz``, ``overall_metrics_<output>.csv``,
    ``confusion_matrices_<output>.npz`` and ``label_stats_<output>.csv`` (weights 1: the species' sampling
    weights say nothing of other outputs); and one ``output, split, crops, acc_top1`` row per output and split."""
    logits = {}
    for split in SPLITS:
        rows = frame[frame["split"] == split]
        loader = eval_loader(rows["path"], rows["label_index"], rows["weight"], crops_root, prep, batch_size,
                             num_workers)
        logits[split] = predict_logits(model, loader, device) if len(rows) else np.zeros((0, sum(model.sizes.values())))
    ends = np.cumsum([0, *model.sizes.values()]).tolist()  # the species head's columns first, then each output's
    bounds = {name: (ends[i], ends[i + 1]) for i, name in enumerate(model.sizes)}
    files, summary = {}, []
    for name, index in output_index.items():
        (start, end), names, outputs = bounds[name], label_names(index), {}
        for split in SPLITS:
            rows = frame[frame["split"] == split]
            known = (rows[output_index_column(name)] >= 0).to_numpy()
            probs = softmax(logits[split][known, start:end])
            labels = [names[i] for i in rows[output_index_column(name)][known]]
            outputs[split] = outputs_frame(rows["path"][known], labels, np.ones(int(known.sum())), probs, names)
            summary.append({"output": name, "split": split, "crops": int(known.sum()),
                            "acc_top1": overall_metrics(outputs[split], names)["acc_top1"] / 100 if known.any()
                            else float("nan")})
        overall, cms, stats, _ = summarize(outputs, names)
        files |= {f"outputs_{split}_{name}.csv.gz": outputs[split] for split in SPLITS}
        files |= {f"overall_metrics_{name}.csv": overall, f"confusion_matrices_{name}.npz": cms,
                  f"label_stats_{name}.csv": stats}
    return files, pd.DataFrame(summary, columns=["output", "split", "crops", "acc_top1"])


def compiled_forms(model: nn.Module, image_size: int, portable: bool = True
                   ) -> dict[str, tuple[bytes, Callable[[torch.Tensor], torch.Tensor]]]:
    """The model's standalone forms, each as its file's bytes and something that runs it as loaded from
    them: TorchScript (the reference's), and with ``portable`` a ``torch.export`` program and ONNX."""
    scripted = script_bytes(compile_model(model, image_size))
    forms = {"torchscript": (scripted, load_script(scripted))}
    if portable:
        program = export_program(model, image_size)
        exported, onnx = program_bytes(program), onnx_bytes(program)
        forms |= {"torch_export": (exported, load_program(exported)), "onnx": (onnx, OnnxModel(onnx))}
    return forms


def evaluate_scripted(scripted: torch.jit.ScriptModule, model_labels: Sequence[str], outputs: pd.DataFrame,
                      crops_root: str | Path, prep: Preprocessing, device: torch.device,
                      mapping: Mapping[str, Sequence[str]] | None = None, batch_size: int = 64,
                      num_workers: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Another model (TorchScript, its own labels) on the crops of an ``outputs`` frame (path, label,
    weight): its probabilities mapped onto the frame's labels (by name, or through ``mapping``; the rest to
    ``other``). Returns its outputs frame and the label columns."""
    targets = [c for c in outputs.columns if c not in ("path", "label", "weight")]
    names, columns = target_columns(model_labels, targets, mapping)
    index = {name: i for i, name in enumerate(names)}
    loader = eval_loader(outputs["path"], outputs["label"].map(index).fillna(-1).astype(int), outputs["weight"],
                         crops_root, prep, batch_size, num_workers)
    probs = softmax(predict_logits(scripted, loader, device, columns))
    return outputs_frame(outputs["path"], outputs["label"], outputs["weight"], probs, names), names


def as_fractions(metrics: Mapping[str, float]) -> dict[str, float]:
    """Overall metrics with the accuracies as fractions (``overall_metrics.csv`` has them in percent)."""
    return {k: v / 100 if k.startswith("acc") else v for k, v in metrics.items()}


def summary_row(outputs: pd.DataFrame, names: Sequence[str]) -> dict[str, float]:
    """The figures models are compared on, all fractions (accuracies too, unlike ``overall_metrics.csv``):
    loss, top-1/top-3 accuracy plain and weighted, and macro precision/recall/F1."""
    report = label_report(outputs, names, "")
    macro = report[report["label"] == MACRO].iloc[0]
    return {**as_fractions(overall_metrics(outputs, names)), "macro_precision": float(macro["precision"]),
            "macro_recall": macro_recall(outputs, names), "macro_f1": float(macro["f1"]), "crops": len(outputs)}


def confident_errors(outputs: pd.DataFrame, names: Sequence[str], per_label: int = 4
                     ) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Per label, the most confident false positives (other labels' crops predicted as it, by its
    probability) and false negatives (its crops predicted as another label, by that label's probability):
    ``{label: {"false_positives": [(path, caption)], "false_negatives": [...]}}``."""
    _, probs, _ = _arrays(outputs, names)
    pred = np.asarray(names)[probs.argmax(axis=1)] if len(outputs) else np.array([], dtype=object)
    conf = probs.max(axis=1) if len(outputs) else np.array([])
    frame = outputs[["path", "label"]].assign(pred=pred, conf=conf)
    found = {}
    for name in names:
        fp = frame[(frame["pred"] == name) & (frame["label"] != name)].nlargest(per_label, "conf")
        fn = frame[(frame["label"] == name) & (frame["pred"] != name)].nlargest(per_label, "conf")
        found[name] = {
            "false_positives": [(r.path, f"was {r.label}\n{r.conf:.2f}") for r in fp.itertuples()],
            "false_negatives": [(r.path, f"as {r.pred}\n{r.conf:.2f}") for r in fn.itertuples()],
        }
    return found
