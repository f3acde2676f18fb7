"""Exclusive label groups: sets of labels of which every image has exactly one (colour in colour + item data,
the class of single-label data), found in the training labels.

A group is an exact cover: its labels never occur together and every image has one of them. The search runs over
the distinct label sets (not the images), by Knuth's Algorithm X, one group at a time on the labels not yet grouped;
a bounded search that runs out says "no group" rather than guess.
"""

from __future__ import annotations

import numpy as np

MAX_NODES = 20_000


def _exact_cover(rows: list[frozenset], labels: list[int], budget: list[int]) -> list[int] | None:
    """Labels (from ``labels``) such that every row holds exactly one of them; None when there is none (or the
    search ran out of ``budget``). Chooses the row with the fewest candidate labels first."""
    if not rows:
        return []
    budget[0] -= 1
    if budget[0] < 0:
        return None
    row = min(rows, key=lambda r: len(r & set(labels)))
    for lab in sorted(row & set(labels)):
        rest = [r for r in rows if lab not in r]
        # the labels still allowed: never in a row with ``lab``
        allowed = [x for x in labels if x != lab and not any(lab in r and x in r for r in rows)]
        found = _exact_cover(rest, allowed, budget)
        if found is not None:
            return [lab, *found]
        if budget[0] < 0:
            return None
    return None


def find_groups(y: np.ndarray, min_positives: int = 5) -> list[list[int]]:
    """Exclusive groups (label indices, each group sorted) in the 0/1 matrix ``y`` [images, labels]: disjoint
    sets of two or more labels, each label with at least ``min_positives`` images, of which every image has exactly
    one. Labels with fewer positives are left out of the search (and so out of every group)."""
    y = np.asarray(y) > 0
    if y.ndim != 2 or len(y) == 0:
        return []
    counts = y.sum(axis=0)
    free = [int(i) for i in np.flatnonzero(counts >= max(1, min_positives))]
    groups: list[list[int]] = []
    while len(free) >= 2:
        rows = list({frozenset(int(i) for i in np.flatnonzero(r) if i in free) for r in y})
        if any(not r for r in rows):  # an image with none of the free labels: no group covers it
            break
        group = _exact_cover(rows, free, [MAX_NODES])
        if not group or len(group) < 2:
            break
        groups.append(sorted(group))
        free = [i for i in free if i not in group]
    return groups
