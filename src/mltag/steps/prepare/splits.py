"""prepare's splits: stable, label-stratified assignment of images to train / val / test."""

from __future__ import annotations

import hashlib
from collections import defaultdict

from mltag.data.formats import Example
from mltag.errors import MltagError


def _unit_hash(key: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:15], 16) / float(1 << 60)


def assign_splits(examples: list[Example], infos: dict[str, dict], val_fraction: float, test_fraction: float,
                  salt: str = "mltag") -> tuple[dict[str, str], list[dict]]:
    """Stable, label-stratified split of ``examples``.

    Each image goes by a hash of its group key (its relative path; exact duplicates
    share the smallest path of their group), so adding images never moves old ones.
    Labels missing from a split are then repaired deterministically by moving the
    group with the smallest hash from the split holding most of that label.

    Returns:
        ``{path: split}`` and the list of repairs made.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise MltagError(f"bad split fractions: val={val_fraction} test={test_fraction}")
    groups: dict[str, list[Example]] = defaultdict(list)
    by_sha: dict[str, str] = {}
    for ex in sorted(examples, key=lambda e: e.path):
        sha = infos.get(ex.path, {}).get("sha256", ex.path)
        key = by_sha.setdefault(sha, ex.path)
        groups[key].append(ex)
    split_of, u = {}, {}
    for key in groups:
        u[key] = _unit_hash(key, salt)
        split_of[key] = "test" if u[key] < test_fraction else "val" if u[key] < test_fraction + val_fraction else "train"
    wanted = [s for s, f in (("train", 1.0), ("val", val_fraction), ("test", test_fraction)) if f > 0]
    n_labels = len(examples[0].flags) if examples else 0
    repairs = []
    for j in range(n_labels):
        for target in wanted:
            holders = defaultdict(list)
            for key, exs in groups.items():
                if any(ex.flags[j] for ex in exs):
                    holders[split_of[key]].append(key)
            if holders.get(target) or sum(len(v) for v in holders.values()) < len(wanted):
                continue
            donor = max(holders, key=lambda s: (len(holders[s]), s == "train"))
            if len(holders[donor]) < 2:
                continue
            key = min(holders[donor], key=lambda k: u[k])
            split_of[key] = target
            repairs.append({"label_index": j, "moved": key, "from": donor, "to": target})
    return {ex.path: split_of[key] for key, exs in groups.items() for ex in exs}, repairs
