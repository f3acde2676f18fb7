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


AT_MOST = "at most one:"  # a declared group's prefix: an image has at most one of its labels


def names_of(group) -> list[str]:
    """A recorded group's label names: an exactly-one group is a list, an at-most-one group ``{"at_most_one": [...]}``."""
    return list(group["at_most_one"]) if isinstance(group, dict) else list(group)


def describe(groups: list) -> str:
    """Recorded groups as a line shows them: ``{black, blue}; at most one of {sale, new}``."""
    return "; ".join(("at most one of {" if isinstance(g, dict) else "{") + ", ".join(names_of(g)) + "}"
                     for g in groups)


def exactly_one(groups: list) -> list[list[str]]:
    """The exactly-one groups among recorded ones."""
    return [list(g) for g in groups if not isinstance(g, dict)]


def at_most_one(groups: list) -> list[list[str]]:
    """The at-most-one groups among recorded ones."""
    return [list(g["at_most_one"]) for g in groups if isinstance(g, dict)]


def parse_groups(text: str, labels: list[str], where) -> list | None:
    """``prepare.label_groups`` read: None for ``auto``, [] for ``none``, else the declared groups
    (``'red,green,blue; at most one: sale,new'``: labels by commas, groups by semicolons, a group an image may also
    have none of after ``at most one:``), checked against ``labels`` (every name known, two or more a group, no
    label in two groups). An exactly-one group is a list of names, an at-most-one group ``{"at_most_one": names}``."""
    from mltag.errors import MltagError

    text = str(text).strip()
    if text.lower() == "auto":
        return None
    if text.lower() in ("none", ""):
        return []
    groups: list = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        at_most = part.lower().startswith(AT_MOST)
        names = [n.strip() for n in part[len(AT_MOST):].split(",") if n.strip()] if at_most else \
            [n.strip() for n in part.split(",") if n.strip()]
        groups.append({"at_most_one": names} if at_most else names)
    known = set(labels)
    for g in map(names_of, groups):
        unknown = [n for n in g if n not in known]
        if unknown:
            raise MltagError(f"prepare.label_groups names label(s) no image has: {', '.join(unknown)} (labels: "
                             f"{', '.join(labels[:20])}{', ...' if len(labels) > 20 else ''})", where)
        if len(g) < 2:
            raise MltagError(f"prepare.label_groups: a group needs two or more labels, got {g} (write groups as "
                             "'red,green,blue; at most one: sale,new')", where)
    seen = [n for g in groups for n in names_of(g)]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise MltagError(f"prepare.label_groups: label(s) in two groups: {', '.join(twice)}", where)
    return groups


def check_declared(groups: list, labels: list[str], y: np.ndarray, paths: list[str], where) -> None:
    """Every image (rows of ``y``, named by ``paths``) has exactly one label of each exactly-one group and at most
    one of each at-most-one group; the first images that do not are named."""
    from mltag.errors import MltagError

    index = {n: i for i, n in enumerate(labels)}
    y = np.asarray(y) > 0
    for group in groups:
        g, at_most = names_of(group), isinstance(group, dict)
        counts = y[:, [index[n] for n in g]].sum(axis=1)
        bad = np.flatnonzero(counts > 1 if at_most else counts != 1)
        if len(bad):
            shown = ", ".join(f"{paths[i]} ({int(counts[i])})" for i in bad[:5])
            raise MltagError(f"prepare.label_groups: every image must have {'at most' if at_most else 'exactly'} one "
                             f"of {', '.join(g)}, but {len(bad)} image(s) have another count, e.g. {shown}; fix "
                             "their labels or the declared groups", where)
