"""Crops whose label the model doubts most: the review list the reference ``identify_mislabeled_candidates.py``
made (it no longer runs on pandas 2)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from animl_assets.core.review.merge import CROP_MARK


def mislabeled_candidates(outputs: pd.DataFrame, labels: Sequence[str], margin: float = 0.95) -> pd.DataFrame:
    """Crops whose predicted label's confidence beats their labelled one's by ``margin`` or more (the
    reference ``identify_mislabeled_candidates.py``, which no longer runs on pandas 2): ``path, image,
    label, pred, pred_conf, label_conf``, most confident first."""
    probs = outputs[list(labels)].to_numpy(dtype=float)
    index = {name: i for i, name in enumerate(labels)}
    rows = np.arange(len(outputs))
    label_conf = probs[rows, outputs["label"].map(index).to_numpy(dtype=int)] if len(outputs) else np.array([])
    pred = probs.argmax(axis=1) if len(outputs) else np.array([], dtype=int)
    frame = pd.DataFrame({"path": outputs["path"], "image": outputs["path"].str.rsplit(CROP_MARK, n=1).str[0],
                          "label": outputs["label"], "pred": np.asarray(labels, dtype=object)[pred],
                          "pred_conf": probs.max(axis=1) if len(outputs) else [], "label_conf": label_conf})
    found = frame[frame["pred_conf"] >= frame["label_conf"] + margin]
    return found.sort_values("pred_conf", ascending=False).reset_index(drop=True)
