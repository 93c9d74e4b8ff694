"""The shard writer: chunk-aligned slabs, exact contents, the .partial protocol, and failing disks."""

from __future__ import annotations

import errno

import h5py
import numpy as np
import pytest
import torch

from workbench.cache import ShardWriter, chunk_rows, from_stored, meta_chunk_rows, to_stored
from workbench.cache import writer as writer_mod
from workbench.errors import WorkbenchError


def _batch(rng: np.random.Generator, n: int, index: int, d: int, store_dtype: str):
    acts = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    tokens = {"token_id": rng.integers(0, 1000, n).astype(np.int32), "sequence": np.full(n, index, np.int64),
              "position": np.arange(n, dtype=np.int32), "batch": np.full(n, index, np.int32)}
    layer = {"activations": to_stored(acts, store_dtype), "norm": acts.norm(dim=1).numpy(),
             "drop_reason": rng.choice(np.array([0, 0, 0, 1, 2], np.uint8), n), "batch_median": float(index)}
    return tokens, layer


@pytest.mark.parametrize("store_dtype", ["float32", "bfloat16", "float16"])
def test_rows_written_in_slabs_read_back_exactly(tmp_path, store_dtype):
    d = 64
    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path, 3, 10, [5], d, store_dtype)
    writer.slab_rows = meta_chunk_rows(d, store_dtype)  # small slabs: many writes, some exactly full
    assert writer.slab_rows % chunk_rows(d, store_dtype) == 0
    sizes = [1000, 3096, 4096, 1, 2047, 4096, 10]  # hits slab boundaries exactly, and between them
    batches = [_batch(rng, n, 10 + i, d, store_dtype) for i, n in enumerate(sizes)]
    for tokens, layer in batches:
        writer.append(tokens, {5: layer})
    assert writer.partial.exists() and not writer.final.exists()
    size = writer.finish({"tokens": sum(sizes)})
    assert not writer.partial.exists() and writer.final.stat().st_size == size
    with h5py.File(tmp_path / "shards" / "shard_000003.h5", "r") as h5:
        assert h5.attrs["complete"] and h5.attrs["num_tokens"] == sum(sizes) and h5.attrs["num_batches"] == len(sizes)
        assert h5.attrs["first_batch"] == 10 and h5.attrs["store_dtype"] == store_dtype
        for name in ("token_id", "sequence", "position", "batch"):
            assert np.array_equal(h5[f"tokens/{name}"][:], np.concatenate([t[name] for t, _ in batches]))
        g = h5["layer_5"]
        want = np.concatenate([layer["activations"] for _, layer in batches])
        assert g["activations"].dtype == want.dtype and np.array_equal(g["activations"][:], want)
        assert g["activations"].chunks == (chunk_rows(d, store_dtype), d)
        assert np.array_equal(g["drop_reason"][:], np.concatenate([la["drop_reason"] for _, la in batches]))
        assert np.array_equal(g["kept"][:], g["drop_reason"][:] == 0)
        assert np.array_equal(g["norm"][:], np.concatenate([la["norm"] for _, la in batches]))
        assert g["batch_median"][:].tolist() == [float(10 + i) for i in range(len(sizes))]
        assert np.array_equal(from_stored(g["activations"][:2], store_dtype),
                              torch.from_numpy(from_stored(want[:2], store_dtype)).numpy())


def test_bfloat16_is_stored_as_its_bits_and_restored_exactly():
    x = torch.tensor([[1.0, -2.5, 3.1415926, 1e-30], [65504.0, -0.0, float("inf"), 3e38]]).to(torch.bfloat16)
    stored = to_stored(x, "bfloat16")
    assert stored.dtype == np.uint16 and np.array_equal(stored, x.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(from_stored(stored, "bfloat16"), x.float().numpy())


def test_a_failing_disk_becomes_one_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """ENOSPC in the middle of a shard (simulated: writes fail after 200 kB)."""
    class FillingDisk:
        """The real file, until 200 kB have been written; then every write fails like a full disk."""

        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            if self.written + len(data) > 200_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    real_init = writer_mod._GuardedFile.__init__

    def init(self, path):
        real_init(self, path)
        self.fh = FillingDisk(self.fh)

    monkeypatch.setattr(writer_mod._GuardedFile, "__init__", init)
    rng = np.random.default_rng(1)
    writer = ShardWriter(tmp_path, 0, 0, [1], 64, "float32")
    writer.slab_rows = meta_chunk_rows(64, "float32")
    with pytest.raises(WorkbenchError) as err:
        for i in range(20):
            tokens, layer = _batch(rng, 1000, i, 64, "float32")
            writer.append(tokens, {1: layer})
        writer.finish({})
    message = str(err.value)
    assert "shard_000000.h5.partial: No space left on device" in message and "free disk space" in message
    assert "\n" not in message
    assert list((tmp_path / "shards").iterdir()) == []
