"""The vector store's packs: written whole, trusted only when they check out, read pack by pack."""

from __future__ import annotations

import os

import numpy as np

from mltag.data.store import FeatureCache


def test_cache_writes_a_batch_as_one_pack_atomically_and_trusts_only_what_checks_out(tmp_path):
    cache = FeatureCache(tmp_path, "bb", 224)
    keys = [cache.key(c * 64) for c in "abc"]
    vecs = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    cache.put_many(keys, vecs)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p.suffix for p in files] == [".pack"]  # one file for the batch, no temp file left
    assert cache.get(keys[1]).dtype == np.float16
    fresh = FeatureCache(tmp_path, "bb", 224)  # another process: reads the packs' key tables
    for k, v in zip(keys, vecs):
        np.testing.assert_array_equal(fresh.get(k), v.astype(np.float16))
    assert fresh.get(cache.key("d" * 64)) is None and fresh.rejected == 0
    fresh.put(cache.key("d" * 64), np.full(4, 0.5))  # written after the index was read: found at once
    np.testing.assert_array_equal(fresh.get(cache.key("d" * 64)), np.full(4, 0.5, np.float16))
    (added,) = set((tmp_path / "packs").iterdir()) - {files[0]}
    added.unlink()  # the checks below are about the first pack alone
    # A pack cut short (e.g. a copy that stopped) loses the entries past the cut, and only those.
    data = files[0].read_bytes()
    files[0].write_bytes(data[:-3])
    cut = FeatureCache(tmp_path, "bb", 224)
    assert [cut.get(k) is not None for k in keys] == [True, True, False] and cut.rejected == 1
    # A damaged key table is never read as other keys: the whole pack is a miss, counted once.
    files[0].write_bytes(data[:30] + bytes([data[30] ^ 1]) + data[31:])
    bad = FeatureCache(tmp_path, "bb", 224)
    assert [bad.get(k) for k in keys] == [None] * 3 and bad.rejected == 1
    # A run holding the lock removes it: its entries are misses anyway, and are recomputed.
    assert bad.clean_leftovers() == 1 and not any((tmp_path / "packs").iterdir())


def test_a_bucket_vector_store_is_read_pack_by_pack_not_vector_by_vector(monkeypatch):
    import fsspec

    store = f"memory://mltag-packs-{os.getpid()}"
    cache = FeatureCache(store, "bb", 32)
    keys = [cache.key(f"{i:064x}") for i in range(100)]
    vecs = np.random.default_rng(0).random((100, 8)).astype(np.float32)
    for i in range(0, 100, 25):
        cache.put_many(keys[i: i + 25], vecs[i: i + 25])
    fs = fsspec.filesystem("memory")
    whole, real = [], fs.cat_file

    def counting(path, start=None, end=None, **kw):
        if start is None and end is None:
            whole.append(path)
        return real(path, start=start, end=end, **kw)

    monkeypatch.setattr(fs, "cat_file", counting)
    fresh = FeatureCache(store, "bb", 32)  # another run: lists the packs, reads their key tables
    got = np.stack([fresh.get(k) for k in keys])
    np.testing.assert_array_equal(got, vecs.astype(np.float16))
    assert len(whole) == len(set(whole)) == 4  # one request per pack, however many vectors it holds


def test_a_gather_over_many_shards_reads_each_pack_once_in_any_order(tmp_path):
    """#55: the gather walked keys across S shards' packs in path order; with more shards than the 8 packs kept, each
    vector cost a whole pack read. ``get_many`` groups the keys by pack: every pack is read once, so the bytes read
    per vector stay near a vector's own size, whatever the order; missing and damaged entries are left out."""
    shards, per_shard, dim = 32, 64, 256
    cache = FeatureCache(tmp_path / "store", "b", 224)
    rng = np.random.default_rng(0)
    keys = {}
    for s in range(shards):  # each shard writes its own packs
        ks = [cache.key(f"{s}-{i}") for i in range(per_shard)]
        vs = rng.standard_normal((per_shard, dim)).astype(np.float16)
        cache.put_many(ks, vs)
        keys.update(zip(ks, vs))
    order = [k for i in range(per_shard) for k in list(keys)[i::per_shard]]  # interleaved across the shards
    reader = FeatureCache(tmp_path / "store", "b", 224)
    for k in order[:200]:
        reader.get(k)
    per_vector_get = reader.bytes_read / 200
    reader = FeatureCache(tmp_path / "store", "b", 224)
    got = reader.get_many(order + [cache.key("absent")])
    assert set(got) == set(keys) and all(np.array_equal(got[k], v) for k, v in keys.items())
    per_vector = reader.bytes_read / len(keys)
    assert per_vector < 1.2 * 2 * dim + 200, per_vector  # a vector's bytes and its share of the key table
    assert per_vector_get > 10 * per_vector  # what a vector cost read one at a time across 32 shards
