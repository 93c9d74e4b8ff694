"""ActivationCache: re-filtering at read time, and the shuffled reader (determinism, ranks, coverage,
holdout, how uniform a batch looks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torch_threads

from workbench.cache import ActivationCache, chunk_rows, prefetch
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.embedded import resolve_model_path, sink_token_ids
from workbench.sink import SINK

LAYERS = [1, 3]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    """The same 200 packed rows (12,800 tokens, 5 shards) collected with sink multiples 10, 1.5 and off."""
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for name, multiple in (("m10", "10"), ("low", "1.5"), ("off", "null")):
        recipe = load_recipe(None, [f"collect.out={root / name}", "data.context_length=64", "data.num_tokens=12800",
                                    "collect.batch_size=8", "collect.shard_batches=5", f"collect.layers={LAYERS}",
                                    f"collect.sink_multiple={multiple}"])
        with torch_threads(1):
            collect(recipe)
        out[name] = root / name
    return out


def _rows(batches) -> np.ndarray:
    """Concatenated batches, rows sorted lexicographically (a multiset of activation vectors)."""
    acts = torch.cat(list(batches)).numpy()
    return acts[np.lexsort(acts.T[::-1])]


def _identify(cache: ActivationCache, layer: int) -> dict[bytes, tuple[int, int]]:
    """Activation vector -> (sequence, position), for the vectors that occur once. A few rows start with
    the same tokens as another row and so have identical activations there; they are left out."""
    r = cache.read(layer)
    keys = [a.tobytes() for a in r["activations"]]
    counts: dict[bytes, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    ids = {k: (int(s), int(p)) for k, s, p in zip(keys, r["sequence"], r["position"], strict=True) if counts[k] == 1}
    assert len(ids) > 0.99 * len(keys)
    return ids


# ---- re-filtering ----------------------------------------------------------------------------------

@pytest.mark.parametrize("source,target,multiple", [("m10", "low", 1.5), ("low", "m10", 10.0), ("off", "m10", 10.0)])
def test_refiltering_at_read_time_equals_collecting_with_that_multiple(caches, source, target, multiple):
    with ActivationCache(caches[source]) as src, ActivationCache(caches[target]) as want:
        for layer in LAYERS:
            got = src.read(layer, include_dropped=True, sink_multiple=multiple)
            ref = want.read(layer, include_dropped=True)
            for key in ref:
                assert np.array_equal(got[key], ref[key]), key
            kept = src.read(layer, sink_multiple=multiple)
            assert np.array_equal(kept["activations"], want.read(layer)["activations"])
            assert src.num_tokens(layer, sink_multiple=multiple) == want.num_tokens(layer) == len(kept["position"])
            in_order = src.batches(layer, 100, shuffle=False, drop_last=False, sink_multiple=multiple)
            assert np.array_equal(torch.cat(list(in_order)).numpy(), want.read(layer)["activations"])
            shuffled = src.batches(layer, 64, seed=3, drop_last=False, sink_multiple=multiple)
            assert np.array_equal(_rows(shuffled), _rows([torch.from_numpy(want.read(layer)["activations"])]))


def test_a_lower_multiple_catches_ordinary_tokens_too(caches):
    """The comparison above is not vacuous: multiple 1.5 drops tokens that are not the planted sinks."""
    planted = set(sink_token_ids(resolve_model_path("embedded:tiny-qwen3")))
    with ActivationCache(caches["m10"]) as m10, ActivationCache(caches["low"]) as low:
        r10, r2 = m10.read(3, include_dropped=True), low.read(3, include_dropped=True)
        sinks10 = set(r10["token_ids"][r10["drop_reason"] == SINK].tolist())
        sinks2 = r2["token_ids"][r2["drop_reason"] == SINK]
        assert sinks10 == planted
        assert (r2["drop_reason"] == SINK).sum() > (r10["drop_reason"] == SINK).sum()
        assert set(sinks2.tolist()) - planted


# ---- the shuffled reader ---------------------------------------------------------------------------

def test_batches_are_deterministic_for_a_seed_and_differ_across_seeds(caches):
    with ActivationCache(caches["m10"]) as cache:
        a = [b.numpy() for b in cache.batches(3, 256, seed=7)]
        b = [b.numpy() for b in cache.batches(3, 256, seed=7)]
        c = [b.numpy() for b in cache.batches(3, 256, seed=8)]
        assert len(a) == cache.num_tokens(3) // 256 and all(x.shape == (256, 64) and x.dtype == np.float32 for x in a)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)) and len(a) == len(b)
        assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("window_bytes", [256 << 20, 4 << 16])
def test_ranks_are_disjoint_and_cover_every_kept_token_once(caches, window_bytes):
    with ActivationCache(caches["m10"]) as cache:
        everything = _rows([torch.from_numpy(cache.read(1)["activations"])])
        shares = [_rows(cache.batches(1, 100, seed=1, rank=r, world_size=3, drop_last=False, window_bytes=window_bytes))
                  for r in range(3)]
        assert all(len(s) > 0 for s in shares)
        assert np.array_equal(_rows([torch.from_numpy(s) for s in shares]), everything)  # once each, none missing
        single = _rows(cache.batches(1, 100, seed=1, drop_last=False, window_bytes=window_bytes))
        assert np.array_equal(single, everything)


def test_holdout_is_disjoint_from_train_and_together_they_are_everything(caches):
    with ActivationCache(caches["m10"]) as cache:
        train_rows = _rows(cache.batches(3, 50, holdout_fraction=0.2, drop_last=False))
        hold_rows = _rows(cache.batches(3, 50, holdout_fraction=0.2, split="holdout", drop_last=False))
        everything = _rows([torch.from_numpy(cache.read(3)["activations"])])
        assert np.array_equal(_rows([torch.from_numpy(train_rows), torch.from_numpy(hold_rows)]), everything)
        assert 0.15 < len(hold_rows) / len(everything) < 0.25
        ids = _identify(cache, 3)
        train = {ids[r.tobytes()] for r in train_rows if r.tobytes() in ids}
        hold = {ids[r.tobytes()] for r in hold_rows if r.tobytes() in ids}
        assert train.isdisjoint(hold) and train | hold == set(ids.values())
        # the holdout is the end of the data stream: later sequences than any training token
        assert min(s for s, _ in hold) >= max(s for s, _ in train) - 4


def _batch_statistics(cache: ActivationCache, layer: int, batches) -> tuple[np.ndarray, np.ndarray]:
    ids = _identify(cache, layer)
    distinct, mean_pos = [], []
    for b in batches:
        toks = [ids[r.tobytes()] for r in b.numpy() if r.tobytes() in ids]
        distinct.append(len({s for s, _ in toks}) / len(toks))
        mean_pos.append(np.mean([p for _, p in toks]))
    return np.array(distinct), np.array(mean_pos)


def test_a_shuffled_batch_looks_like_a_uniform_sample_of_tokens(caches):
    """Distinct sequences per batch and the spread of batch-mean positions, against what uniform sampling
    without replacement gives (computed, not guessed); the same statistics on unshuffled batches show
    that they would catch a poor shuffle."""
    B = 64
    with ActivationCache(caches["m10"]) as cache:
        r = cache.read(3)
        seq_sizes = np.bincount(r["sequence"])
        seq_sizes = seq_sizes[seq_sizes > 0]
        n = len(r["sequence"])
        # E[distinct sequences] in B draws without replacement from n tokens grouped into sequences
        p_missed = np.exp(np.log1p(-seq_sizes[:, None] / (n - np.arange(B))[None, :]).sum(axis=1))
        expected_distinct = np.sum(1 - p_missed)
        pos = r["position"].astype(float)
        expected_sd = pos.std() / np.sqrt(B) * np.sqrt((n - B) / (n - 1))

        distinct, mean_pos = _batch_statistics(cache, 3, cache.batches(3, B, seed=0))
        assert distinct.mean() * B == pytest.approx(expected_distinct, rel=0.03)
        assert abs(mean_pos.mean() - pos.mean()) < 3 * expected_sd / np.sqrt(len(mean_pos))
        assert 0.8 < mean_pos.std() / expected_sd < 1.2

        # Windows smaller than the cache (16 of its 50 blocks of 256 rows = 4 sequences each): a batch is
        # a uniform sample of its window of 64 random sequences.
        assert cache.blocks(3)[0].stop == chunk_rows(64, "float32") == 256 and len(cache.blocks(3)) == 50
        distinct_w, mean_pos_w = _batch_statistics(cache, 3, cache.batches(3, B, seed=0, window_bytes=16 << 16))
        window_expected = 64 * (1 - (1 - 1 / 64) ** B) / B
        assert distinct_w.mean() > 0.9 * window_expected
        assert abs(mean_pos_w.mean() - pos.mean()) < 3 * expected_sd / np.sqrt(len(mean_pos_w))

        plain, _ = _batch_statistics(cache, 3, cache.batches(3, B, shuffle=False))
        assert plain.mean() < 0.05  # a batch of consecutive tokens is one sequence


def test_prefetch_yields_the_same_items_and_reraises_errors():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        list(prefetch(broken()))


def test_cache_layout_is_plain_hdf5(caches):
    """What the docstring of cache/layout.py documents is what is on disk."""
    import h5py

    with ActivationCache(caches["m10"]) as cache:
        m = cache.manifest
        assert m["complete"] and m["layers"] == LAYERS and m["d_model"] == 64 and m["chunk_rows"] == 256
        assert m["requested_rows"] == 200 and m["requested_tokens"] == 12800 and m["summary"]["tokens"] == 12800
        assert [s["file"] for s in m["shards"]] == [f"shards/shard_{i:06d}.h5" for i in range(5)]
        with h5py.File(Path(caches["m10"]) / m["shards"][1]["file"], "r") as h5:
            assert h5.attrs["complete"] and h5.attrs["first_batch"] == 5 and h5.attrs["num_batches"] == 5
            n = h5.attrs["num_tokens"]
            assert n == 5 * 8 * 64 == m["shards"][1]["num_tokens"]
            assert h5["tokens/sequence"][0] == 40 and h5["tokens/position"][:64].tolist() == list(range(64))
            for name, dtype in (("token_id", "int32"), ("sequence", "int64"), ("position", "int32"), ("batch", "int32")):
                assert h5[f"tokens/{name}"].dtype == dtype and h5[f"tokens/{name}"].shape == (n,)
            g = h5["layer_3"]
            assert g["activations"].shape == (n, 64) and g["activations"].chunks == (256, 64)
            assert g["batch_median"].shape == (5,) and g["norm"].dtype == "float32"
            assert np.array_equal(g["kept"][:], g["drop_reason"][:] == 0)
            # torch's fp32 norm at collection against numpy's: 64 squares summed in another order (~1e-7)
            assert np.allclose(g["norm"][:], np.linalg.norm(g["activations"][:], axis=1), rtol=1e-5)


def test_the_fast_chunk_path_and_the_hdf5_path_read_the_same_rows(caches, monkeypatch):
    """Plain chunks are read with pread at the offsets of HDF5's chunk index; without os.preadv the
    reader goes through HDF5. Both give the same batches."""
    with ActivationCache(caches["m10"]) as fast:
        got_fast = [b.numpy() for b in fast.batches(1, 500, seed=4, drop_last=False, sink_multiple=1.5)]
        assert all(fast._chunk_reader(1, s).fd is not None for s in range(len(fast.shards)))
    monkeypatch.delattr("os.preadv")
    with ActivationCache(caches["m10"]) as slow:
        got_slow = [b.numpy() for b in slow.batches(1, 500, seed=4, drop_last=False, sink_multiple=1.5)]
        assert slow._chunk_reader(1, 0).fd is None
    assert len(got_fast) == len(got_slow) and all(np.array_equal(a, b) for a, b in zip(got_fast, got_slow, strict=True))


def test_more_ranks_than_blocks_leaves_some_ranks_empty_and_still_covers_everything(caches):
    with ActivationCache(caches["m10"]) as cache:
        n = cache.num_blocks()
        shares = [list(cache.batches(3, 1000, rank=r, world_size=n + 7, drop_last=False)) for r in range(n + 7)]
        assert sum(1 for s in shares if not s) == 7
        got = _rows([b for s in shares for b in s])
        assert np.array_equal(got, _rows([torch.from_numpy(cache.read(3)["activations"])]))


@pytest.mark.parametrize(("window_bytes", "multiple"), [(4 << 16, None), (256 << 20, None), (4 << 16, 1.5)])
def test_a_pass_resumed_from_any_position_gives_the_batches_that_followed_it(caches, window_bytes, multiple):
    """The checkpoint's read position: from the position after batch i, the same pass (rank 1 of 2, holdout,
    small windows carrying rows across, a re-filter) goes on with batch i + 1, bit for bit, through a
    round trip as a checkpoint stores it."""
    import io

    from workbench.cache import ReadPosition

    kw = dict(seed=5, rank=1, world_size=2, holdout_fraction=0.1, window_bytes=window_bytes, sink_multiple=multiple)
    with ActivationCache(caches["m10"]) as cache:
        straight = list(cache.positioned_batches(1, 96, **kw))
        assert len(straight) > 8
        for i in (0, 1, len(straight) // 2, len(straight) - 2, len(straight) - 1):
            buf = io.BytesIO()
            torch.save(straight[i][1].to_state(), buf)
            buf.seek(0)
            position = ReadPosition.from_state(torch.load(buf, weights_only=True))
            rest = [x for x, _ in cache.positioned_batches(1, 96, start=position, **kw)]
            assert len(rest) == len(straight) - i - 1
            assert all(torch.equal(a, b) for a, b in zip(rest, (x for x, _ in straight[i + 1:]), strict=True)), i
        assert [x.numpy().tobytes() for x, _ in straight] == [x.numpy().tobytes() for x in cache.batches(1, 96, **kw)]


def test_a_resume_reads_one_window_however_far_the_pass_got(caches):
    kw = dict(seed=2, window_bytes=4 << 16)
    with ActivationCache(caches["m10"]) as cache:
        straight = list(cache.positioned_batches(1, 64, **kw))
        per_window, blocks = straight[0][1].per_window, straight[0][1].blocks
        assert blocks >= 4 * per_window  # several windows, so the two positions lie in different ones
        costs = []
        for i in (len(straight) // 10, len(straight) * 9 // 10):
            before = cache.blocks_read
            next(cache.positioned_batches(1, 64, start=straight[i][1], **kw))
            costs.append(cache.blocks_read - before)
        assert costs == [per_window, per_window]
        with pytest.raises(ValueError, match="the read position is of another pass"):
            next(cache.positioned_batches(1, 32, start=straight[0][1], **kw))
