"""The HDF5 activation cache: layout.py (what a cache directory holds: names, dtypes, checksums, the
manifest, its statistics, the size formula), writer.py (the shard writer collection uses), reader.py
(`ActivationCache`: checked, shuffled reads) and inspect.py (`workbench inspect`)."""

from workbench.cache.layout import (
    LayerStats,
    Manifest,
    ShardCheck,
    Summary,
    chunk_rows,
    from_stored,
    meta_chunk_rows,
    shard_is_complete,
    to_stored,
    verify_shard,
)
from workbench.cache.reader import ActivationCache, ReadPosition, prefetch
from workbench.cache.writer import ShardWriter, write_error

__all__ = ["ActivationCache", "LayerStats", "Manifest", "ReadPosition", "ShardCheck", "ShardWriter", "Summary", "chunk_rows",
           "from_stored", "meta_chunk_rows", "prefetch", "shard_is_complete", "to_stored", "verify_shard",
           "write_error"]
