"""Follow-up comparison of two lesion tables: lesions matched by overlap after registration, and their change.

Inputs are the current scan's lesion map and the prior scan's lesion map resampled onto the current
grid (both: voxel value = the lesion's number in its own scan's table), and the two tables.

**Matching.** Lesions are linked when they overlap (at least :data:`MIN_OVERLAP` of the smaller
one's voxels); each connected group of links is one row. A group of one prior and one current lesion
is a one-to-one match; one prior lesion linked to several current ones is a **split**, several prior
ones linked to one current lesion a **merge** (many-to-many: both); their numbers are joined with
``+``. A current lesion with no link is **new**, a prior lesion with no link **resolved**. Overlap
graphs rather than Hungarian one-to-one assignment, so that a bleed that merged with its neighbour is
compared as a whole rather than half of it being reported as resolved.

**Change.** Volumes are each scan's own measured volumes (rigid registration preserves volume; the
resampled map is used only to link). ``change_ml = current − prior``, ``change_pct`` relative to the
prior (empty for new lesions). Status: ``stable`` when |change| ≤ max(``stable_ml``, ``stable_pct`` %
of the prior), else ``grown`` or ``shrunk``. **Hematoma expansion** (matched lesions and the total):
growth > ``expansion_ml`` mL or > ``expansion_pct`` % (default 6 mL or 33 %, the most common definition;
e.g. ``expansion_ml=12.5`` applies another trial's). New and resolved lesions are never flagged
``expansion`` — they have their own status.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

#: share of the smaller lesion's voxels that must overlap for two lesions to be linked
MIN_OVERLAP = 0.05
#: the first columns of comparison.csv, in this order
COMPARISON_COLUMNS: tuple[str, ...] = (
    "current_lesion", "prior_lesion", "status", "prior_ml", "current_ml", "change_ml", "change_pct", "expansion",
    "centroid_r", "centroid_a", "centroid_s", "match",
)


@dataclass(frozen=True)
class ChangeRules:
    """When a change is stable, and when it is hematoma expansion."""

    stable_ml: float = 0.5
    stable_pct: float = 10.0
    expansion_ml: float = 6.0
    expansion_pct: float = 33.0

    def status(self, prior_ml: float, current_ml: float) -> str:
        if prior_ml <= 0 and current_ml <= 0:
            return "stable"
        if prior_ml <= 0:
            return "new"
        if current_ml <= 0:
            return "resolved"
        change = current_ml - prior_ml
        if abs(change) <= max(self.stable_ml, self.stable_pct / 100.0 * prior_ml):
            return "stable"
        return "grown" if change > 0 else "shrunk"

    def expansion(self, prior_ml: float, current_ml: float) -> bool:
        if prior_ml <= 0 or current_ml <= 0:
            return False
        change = current_ml - prior_ml
        return change > self.expansion_ml or 100.0 * change / prior_ml > self.expansion_pct

    def to_json(self) -> dict:
        return asdict(self)


def link_lesions(current_map: np.ndarray, prior_map: np.ndarray, current_voxels: Mapping[int, int],
                 prior_voxels: Mapping[int, int]) -> list[tuple[list[int], list[int]]]:
    """Groups of (current lesion numbers, prior lesion numbers) linked by overlap, unlinked ones alone.

    ``*_voxels``: each lesion's voxel count on the current grid (its own map), for the overlap share.
    """
    both = (current_map > 0) & (prior_map > 0)
    pairs, counts = np.unique(np.stack([current_map[both], prior_map[both]]), axis=1, return_counts=True) \
        if both.any() else (np.zeros((2, 0), int), np.zeros(0, int))
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for (c, p), n in zip(pairs.T.tolist(), counts.tolist()):
        smaller = min(current_voxels.get(c, 0), prior_voxels.get(p, 0)) or 1
        if n >= MIN_OVERLAP * smaller:
            parent[find(("c", c))] = find(("p", p))
    for c in current_voxels:
        find(("c", c))
    for p in prior_voxels:
        find(("p", p))
    groups: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for node in list(parent):
        cur, pri = groups.setdefault(find(node), ([], []))
        (cur if node[0] == "c" else pri).append(node[1])
    out = [(sorted(c), sorted(p)) for c, p in groups.values()]
    return sorted(out, key=lambda g: (min(g[0]) if g[0] else 10**9, min(g[1]) if g[1] else 10**9))


def compare_tables(groups: Sequence[tuple[list[int], list[int]]], current_rows: Sequence[Mapping],
                   prior_rows: Sequence[Mapping], prior_centroids_current_ras: Mapping[int, np.ndarray],
                   rules: ChangeRules) -> tuple[list[dict], dict]:
    """Rows of comparison.csv (one per group) and the total row.

    ``prior_centroids_current_ras``: each prior lesion's centroid mapped into the current scan's RAS
    (the position reported for a resolved lesion).
    """
    cur = {int(r["lesion"]): r for r in current_rows}
    pri = {int(r["lesion"]): r for r in prior_rows}
    rows = []
    for c_nums, p_nums in groups:
        prior_ml = float(sum(float(pri[p]["volume_ml"]) for p in p_nums))
        current_ml = float(sum(float(cur[c]["volume_ml"]) for c in c_nums))
        if c_nums:
            w = np.array([float(cur[c]["volume_ml"]) for c in c_nums])
            pts = np.array([[float(cur[c][f"centroid_{a}"]) for a in "ras"] for c in c_nums])
        else:
            w = np.array([float(pri[p]["volume_ml"]) for p in p_nums])
            pts = np.array([prior_centroids_current_ras[p] for p in p_nums])
        centroid = (w[:, None] * pts).sum(0) / w.sum()
        rows.append(_row(c_nums, p_nums, prior_ml, current_ml, centroid, rules))
    rows.sort(key=lambda r: (r["current_lesion"] == "", _first(r["current_lesion"]), _first(r["prior_lesion"])))
    total = _row([], [], float(sum(float(r["volume_ml"]) for r in prior_rows)),
                 float(sum(float(r["volume_ml"]) for r in current_rows)), None, rules)
    total.update(current_lesion="total", prior_lesion="total", match="")
    return rows, total


def _first(numbers: str) -> int:
    return int(numbers.split("+")[0]) if numbers else 10**9


def _row(c_nums: list[int], p_nums: list[int], prior_ml: float, current_ml: float, centroid, rules: ChangeRules) -> dict:
    change = current_ml - prior_ml
    match = ("one-to-one" if len(c_nums) == len(p_nums) == 1 else
             "split" if len(p_nums) == 1 and len(c_nums) > 1 else
             "merge" if len(c_nums) == 1 and len(p_nums) > 1 else
             "many-to-many" if c_nums and p_nums else "unmatched")
    return {
        "current_lesion": "+".join(map(str, c_nums)),
        "prior_lesion": "+".join(map(str, p_nums)),
        "status": rules.status(prior_ml, current_ml),
        "prior_ml": prior_ml,
        "current_ml": current_ml,
        "change_ml": change,
        "change_pct": 100.0 * change / prior_ml if prior_ml > 0 else None,
        "expansion": rules.expansion(prior_ml, current_ml),
        **({f"centroid_{a}": float(centroid[i]) for i, a in enumerate("ras")} if centroid is not None
           else dict.fromkeys(("centroid_r", "centroid_a", "centroid_s"))),
        "match": match,
    }
