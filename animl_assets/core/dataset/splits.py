"""Train/val/test splits by (dataset, location), so no camera site leaks across splits.

``random`` minimizes MegaDetector's objective over many random location assignments, all scored at
once with matrix products (the reference scores one trial at a time in pandas); ``smallest_first``
is the greedy method of the reference README, with its location-order bug fixed. Locations that share a
sequence (a burst written under two locations, e.g. across a deployment's start) are one unit, so no burst
straddles two splits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
JITTER = 0.03  # the reference jitters the train (and val) share by up to this much per trial


def pair_keys(frame: pd.DataFrame) -> pd.Series:
    """One string per row for its (dataset, location) pair, built column-wise (no per-row Python)."""
    return frame["dataset"].astype(str) + "\x1f" + frame["location"].astype(str)


def _key(dataset: Any, location: Any) -> str:
    return f"{dataset}\x1f{location}"


def _targets(val_frac: float, test_frac: float) -> np.ndarray:
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac {val_frac} and test_frac {test_frac} must be fractions summing below 1")
    return np.array([1.0 - val_frac - test_frac, val_frac, test_frac])


def location_label_counts(ds: pd.DataFrame) -> tuple[list[tuple[str, str]], list[str], np.ndarray]:
    """(dataset, location) keys, sorted labels, and the crops per location (rows) and label (columns)."""
    dataset_codes, datasets = pd.factorize(ds["dataset"].astype(str), sort=True)
    location_codes, locations = pd.factorize(ds["location"].astype(str), sort=True)
    # codes of sorted uniques combine into one code per pair that sorts as (dataset, location) does
    pair_codes, loc_codes = np.unique(dataset_codes.astype(np.int64) * len(locations) + location_codes,
                                      return_inverse=True)
    label_codes, labels = pd.factorize(ds["label"], sort=True)
    counts = np.bincount(loc_codes * len(labels) + label_codes, minlength=len(pair_codes) * len(labels))
    locs = [(datasets[code // len(locations)], locations[code % len(locations)]) for code in pair_codes]
    return locs, list(labels), counts.reshape(len(locs), len(labels))


def _score_assignments(assign: np.ndarray, counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The objective of each row of ``assign`` (trials x locations, split codes 0/1/2)."""
    crops = counts.astype(np.float32)
    present = (counts > 0).astype(np.float32)
    onehot = (assign[:, None, :] == np.arange(3, dtype=assign.dtype)[None, :, None]).astype(np.float32)
    flat = onehot.reshape(-1, counts.shape[0])
    crop_frac = (flat @ crops).reshape(len(assign), 3, -1) / crops.sum(axis=0)
    loc_frac = (flat @ present).reshape(len(assign), 3, -1) / present.sum(axis=0)
    wanted = targets.astype(np.float32)[None, :, None]
    return (2 * ((crop_frac - wanted) ** 2).sum(axis=(1, 2)) + ((loc_frac - wanted) ** 2).sum(axis=(1, 2)))


def _random_assignment(counts: np.ndarray, val_frac: float, test_frac: float, seed: int, trials: int,
                       chunk: int = 256) -> tuple[np.ndarray, float]:
    num_locs = counts.shape[0]
    targets = _targets(val_frac, test_frac)
    rng = np.random.default_rng(seed)
    positions = np.arange(num_locs)
    best, best_score = None, np.inf
    for start in range(0, trials, chunk):
        n = min(chunk, trials - start)
        num_train = (num_locs * (targets[0] + rng.uniform(-JITTER, JITTER, n))).astype(int)
        num_val = ((num_locs * (val_frac + rng.uniform(-JITTER, JITTER, n))).astype(int) if test_frac > 0
                   else num_locs - num_train)
        order = rng.permuted(np.broadcast_to(positions, (n, num_locs)), axis=1)  # order[t, j]: j-th location
        split_at = ((positions >= num_train[:, None]).astype(np.int8)
                    + (positions >= (num_train + num_val)[:, None]).astype(np.int8))
        assign = np.empty((n, num_locs), dtype=np.int8)
        np.put_along_axis(assign, order, split_at, axis=1)
        scores = _score_assignments(assign, counts, targets)
        winner = int(np.argmin(scores))
        if scores[winner] < best_score:
            best, best_score = assign[winner].copy(), float(scores[winner])
    return best, best_score


def _smallest_first(locs: list, labels: list[str], counts: np.ndarray, val_frac: float, test_frac: float,
                    prioritize: dict[str, list[str]]) -> np.ndarray:
    assign = np.full(len(locs), -1, dtype=np.int8)
    totals = counts.sum(axis=0)
    per_split = np.zeros((3, len(labels)))
    for k in sorted(range(len(labels)), key=lambda k: (totals[k], labels[k])):  # fewest crops first
        preferred = set(prioritize.get(labels[k], []))
        candidates = [i for i in np.flatnonzero(counts[:, k]) if assign[i] < 0]
        for i in sorted(candidates, key=lambda i: (locs[i][0] not in preferred, counts[i, k], locs[i])):
            if per_split[2, k] < test_frac * totals[k]:
                split = 2
            elif per_split[1, k] < val_frac * totals[k]:
                split = 1
            else:
                split = 0
            assign[i] = split
            per_split[split] += counts[i]
    return assign


def _as_splits(locs: list, assign: np.ndarray) -> dict[str, list[list[str]]]:
    return {name: [list(locs[i]) for i in np.flatnonzero(assign == code)] for code, name in enumerate(SPLITS)}


def linked_locations(ds: pd.DataFrame, sequence_of: dict[str, str]) -> list[list[tuple[str, str]]]:
    """Groups of (dataset, location) pairs that share a sequence, each sorted, for rows of ``ds`` whose ``path``
    ``sequence_of`` maps to a sequence; locations linked to no other are left out."""
    rows = pd.DataFrame({"sequence": ds["path"].map(sequence_of), "pair": pair_keys(ds)}).dropna()
    spans = rows.drop_duplicates().groupby("sequence")["pair"].agg(list)
    parent: dict[str, str] = {}

    def root(pair: str) -> str:
        while parent.setdefault(pair, pair) != pair:
            pair = parent[pair]
        return pair

    for pairs in spans[spans.map(len) > 1]:
        for other in pairs[1:]:
            a, b = sorted((root(pairs[0]), root(other)))
            parent[b] = a
    groups: dict[str, list[tuple[str, str]]] = {}
    for pair in parent:
        dataset, _, location = pair.partition("\x1f")
        groups.setdefault(root(pair), []).append((dataset, location))
    return sorted(sorted(group) for group in groups.values())


def _as_units(ds: pd.DataFrame, linked: list[list[tuple[str, str]]]) -> tuple[pd.DataFrame, dict]:
    """``ds`` with each linked group's locations renamed to its first one, and {first: the group}."""
    if not linked:
        return ds, {}
    rename = {_key(*pair): group[0][1] for group in linked for pair in group[1:]}
    renamed = pair_keys(ds).map(rename)
    return (ds.assign(location=renamed.fillna(ds["location"].astype(str))),
            {tuple(group[0]): group for group in linked})


def make_splits(ds: pd.DataFrame, *, val_frac: float, test_frac: float, method: str = "random", seed: int = 0,
                trials: int = 10_000, prioritize: dict[str, list[str]] | None = None,
                test_locations: list | None = None, linked: list[list[tuple[str, str]]] | None = None
                ) -> dict[str, list[list[str]]]:
    """``splits.json``: {"train"|"val"|"test": [[dataset, location], …]} for classification_ds rows.

    ``random``: the best of ``trials`` seeded random assignments under ``split_score``.
    ``smallest_first``: labels from fewest crops up, each label's unassigned locations from smallest up
    (datasets in ``prioritize[label]`` first), filling test, then val, then train.
    ``test_locations`` (from match_test) are put in test; the rest is split into train and val.
    Each group of ``linked`` locations (``linked_locations``) goes to one split as a whole.
    """
    if method not in ("random", "smallest_first"):
        raise ValueError(f"method must be 'random' or 'smallest_first', not {method!r}")
    fixed = {(str(d), str(loc)) for d, loc in (test_locations or [])}
    if fixed and test_frac:
        raise ValueError("test_frac must be 0 when the test split comes from match_test")
    fixed |= {pair for group in linked or [] if fixed & set(group) for pair in group}
    if fixed:
        ds = ds[~pair_keys(ds).isin({_key(*loc) for loc in fixed}).to_numpy()]
    ds, groups = _as_units(ds, [group for group in linked or [] if not fixed & set(group)])
    locs, labels, counts = location_label_counts(ds)
    _targets(val_frac, test_frac)
    if not locs:
        assign = np.zeros(0, dtype=np.int8)
    elif method == "random":
        assign, _ = _random_assignment(counts, val_frac, test_frac, seed, trials)
    else:
        assign = _smallest_first(locs, labels, counts, val_frac, test_frac, prioritize or {})
    splits = {name: sorted(list(pair) for loc in chosen for pair in groups.get(tuple(loc), [tuple(loc)]))
              for name, chosen in _as_splits(locs, assign).items()}
    splits["test"] = sorted(splits["test"] + [list(loc) for loc in fixed])
    return splits


def _assignment_of(locs: list, splits: dict[str, list]) -> np.ndarray:
    where = {(str(d), str(loc)): code for code, name in enumerate(SPLITS) for d, loc in splits.get(name, [])}
    return np.array([where.get(loc, -1) for loc in locs], dtype=np.int8)


def split_score(ds: pd.DataFrame, splits: dict[str, list], *, val_frac: float, test_frac: float) -> float:
    """The reference objective: Σ over splits of 2·Σ_label (crop fraction − target)² +
    Σ_label (location fraction − target)²; lower is better."""
    locs, _, counts = location_label_counts(ds)
    return float(_score_assignments(_assignment_of(locs, splits)[None, :], counts,
                                    _targets(val_frac, test_frac))[0])


def check_splits(ds: pd.DataFrame, splits: dict[str, list], expected: tuple[str, ...] = SPLITS
                 ) -> tuple[list[str], dict[str, str]]:
    """Leaks (a location in two splits, or in none) and, per label missing from an ``expected`` split, why."""
    seen: dict[tuple[str, str], str] = {}
    leaks = []
    for name in SPLITS:
        for d, loc in splits.get(name, []):
            key = (str(d), str(loc))
            if key in seen:
                leaks.append(f"location {key} is in both {seen[key]} and {name}")
            seen[key] = name
    locs, labels, counts = location_label_counts(ds)
    leaks += [f"location {loc} has crops but no split" for loc in locs if loc not in seen]
    assign = np.array([SPLITS.index(seen[loc]) if loc in seen else -1 for loc in locs])
    wanted = [SPLITS.index(name) for name in expected]
    missing: dict[str, str] = {}
    for k, label in enumerate(labels):
        at = np.flatnonzero(counts[:, k])
        absent = [SPLITS[code] for code in wanted if not (assign[at] == code).any()]
        if absent:
            reason = (f"only {len(at)} location(s), fewer than the {len(wanted)} splits"
                      if len(at) < len(wanted) else
                      "the chosen split put none of its locations there" if all(splits.get(s) for s in absent) else
                      f"{' and '.join(s for s in absent if not splits.get(s))} got no location at all "
                      f"(too few locations for the requested fractions)")
            missing[label] = f"missing from {', '.join(absent)}: {reason}"
    return leaks, missing


def split_table(ds: pd.DataFrame, splits: dict[str, list]) -> pd.DataFrame:
    """Crops per label (rows) and split (columns)."""
    where = {_key(d, loc): name for name in SPLITS for d, loc in splits.get(name, [])}
    split = pair_keys(ds).map(where)
    return pd.crosstab(ds["label"].to_numpy(), split.fillna("none").to_numpy()).reindex(
        columns=[s for s in SPLITS if s in set(split)] + (["none"] if split.isna().any() else []), fill_value=0)


def prioritize_by_label(spec: dict[str, dict[str, Any]] | None) -> dict[str, list[str]]:
    """label -> datasets to take first, flattened from the spec's ``prioritize`` levels."""
    return {label: [d for level in body.get("prioritize", []) for d in level]
            for label, body in (spec or {}).items() if body.get("prioritize")}
