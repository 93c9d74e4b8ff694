"""The SAEs: the modules (BatchTopK, Matryoshka BatchTopK) and the sparse training path they train with."""

from workbench.sae.modules import (
    SAE,
    BatchTopKSAE,
    MatryoshkaBatchTopKSAE,
    matryoshka_group_sizes,
    unit_norm_rows,
)
from workbench.sae.sparse import (
    Kept,
    auxk_select,
    batch_topk,
    batch_topk_select,
    decode_kept,
    encode_kept,
    jumprelu,
)

__all__ = [
    "SAE",
    "BatchTopKSAE",
    "Kept",
    "auxk_select",
    "MatryoshkaBatchTopKSAE",
    "batch_topk",
    "batch_topk_select",
    "decode_kept",
    "encode_kept",
    "jumprelu",
    "matryoshka_group_sizes",
    "unit_norm_rows",
]
