"""The format-neutral SAE every conversion passes through, and block-wise access to its tensors.

`SAEWeights` holds one SAE in SAELens' orientation (D = d_in, F = d_sae):

    x'_BD    = x_BD - b_dec_D            when apply_b_dec_to_input, else x_BD
    pre_BF   = x'_BD @ W_enc_DF + b_enc_F
    f_BF     = relu(pre_BF) * (pre_BF > threshold_F)      activation "jumprelu" (strict >)
             = relu(pre_BF) at each token's k largest     activation "topk"
             = relu(pre_BF)                               activation "relu"
    x_hat_BD = f_BF @ W_dec_FD + b_dec_D

A BatchTopK or Matryoshka SAE is "jumprelu" with one constant threshold, plus its training k (an
average over the batch, not a per-token rule) and, for Matryoshka, its group sizes.

The two weight matrices may be lazy (`FileRows`, `Scaled`, or a tensor memory-mapped from a
checkpoint): writers read them a block of rows at a time, so converting a 65536 x 4096 fp32 SAE never
holds a second full copy of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from workbench.errors import WorkbenchError
from workbench.files import write_atomic
from workbench.provenance import Provenance

BLOCK_BYTES = 64 << 20  # rows per block: about this many bytes
TILE = 8192  # columns per tile when a block is transposed (keeps both sides of the copy in cache)


@dataclass
class FileRows:
    """A 2-d or 1-d tensor in a safetensors file, read a block of rows at a time and cast to `dtype`.

    The file is opened per block, so nothing stays mapped between blocks and memory stays bounded."""

    path: Path
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice(self.name)[start:stop].to(self.dtype)


@dataclass
class Scaled:
    """base * row_scale[:, None] * col_scale[None, :], computed a block at a time (how folds stay lazy)."""

    base: Source
    row_scale: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return shape_of(self.base)

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.base)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        block = rows(self.base, start, stop)
        if self.row_scale is not None:
            block = block * self.row_scale[start:stop, None]
        if self.col_scale is not None:
            block = block * self.col_scale
        return block


Source = torch.Tensor | FileRows | Scaled


def shape_of(src: Source) -> tuple[int, ...]:
    return tuple(src.shape)


def dtype_of(src: Source) -> torch.dtype:
    return src.dtype


def rows(src: Source, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of a source (a view for in-memory or memory-mapped tensors)."""
    return src[start:stop] if isinstance(src, torch.Tensor) else src.rows(start, stop)


def row_blocks(src: Source) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about BLOCK_BYTES each."""
    shape = shape_of(src)
    row_bytes = max(1, (shape[1] if len(shape) > 1 else 1) * dtype_of(src).itemsize)
    step = max(1, BLOCK_BYTES // row_bytes)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def contiguous_rows(src: Source, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop as a contiguous tensor (what a writer streams to disk)."""
    block = rows(src, start, stop)
    if block.is_contiguous():
        return block
    out = torch.empty(block.shape, dtype=block.dtype)
    copy_tiled(out, block)
    return out


def copy_tiled(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src for 2-d tensors of which one is a transposed view, TILE columns at a time: a
    whole-block strided copy is about 2x slower (every row of the transposed side misses the cache)."""
    if src.dim() < 2:
        dst.copy_(src)
        return
    for c in range(0, src.shape[1], TILE):
        dst[:, c:c + TILE] = src[:, c:c + TILE]


def materialize(src: Source) -> torch.Tensor:
    """A fresh contiguous in-memory copy with its own storage (safe to torch.save)."""
    out = torch.empty(shape_of(src), dtype=dtype_of(src))
    for start, stop in row_blocks(src):
        copy_tiled(out[start:stop], rows(src, start, stop))
    return out


def materialize_T(src: Source) -> torch.Tensor:
    """The transpose of a 2-d source as a fresh contiguous tensor, filled a block of rows at a time."""
    n_rows, n_cols = shape_of(src)
    out = torch.empty(n_cols, n_rows, dtype=dtype_of(src))
    for start, stop in row_blocks(src):
        copy_tiled(out[:, start:stop].T, rows(src, start, stop))
    return out


def vec_times(v_R: torch.Tensor, src: Source) -> torch.Tensor:
    """v_R @ src for a 2-d source [R, C], block by block, accumulated in float64 then cast back."""
    acc = torch.zeros(shape_of(src)[1], dtype=torch.float64)
    for start, stop in row_blocks(src):
        acc += v_R[start:stop].double() @ rows(src, start, stop).double()
    return acc.to(dtype_of(src))


def row_norms(src: Source) -> torch.Tensor:
    """L2 norm of each row of a 2-d source, block by block."""
    return torch.cat([rows(src, start, stop).norm(dim=1) for start, stop in row_blocks(src)])


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what both formats hold


def check_shapes(path: Path, shapes: dict[str, tuple[int, ...]], layout: dict[str, str]) -> tuple[int, int]:
    """Check a file's tensor shapes against its format's layout; returns (D, F).

    layout: each tensor's dimensions as letters, D = d_in / activation_dim, F = d_sae / dict_size,
    G = any length, "" = 0-d (e.g. {"W_enc": "DF", "b_enc": "F", "k": ""}). D and F are read from the
    first 2-d tensor; one line lists every shape when any disagrees (the one check both formats use)."""
    first = next(name for name, dims in layout.items() if len(dims) == 2)
    sizes = dict(zip(layout[first], shapes[first], strict=True))
    for name, dims in layout.items():
        shape = shapes[name]
        if len(shape) != len(dims) or any(d != "G" and sizes[d] != n for d, n in zip(dims, shape, strict=True)):
            have = ", ".join(f"{n} {list(shapes[n])}" for n in layout)
            expected = ", ".join(f"{n} [{', '.join(dims)}]" for n, dims in layout.items())
            raise WorkbenchError(f"{path}: the tensor shapes disagree ({have}; expected {expected} with D = d_in, "
                                 "F = d_sae); the file is damaged or mislabelled: re-export it")
    return sizes["D"], sizes["F"]


def check_sizes(path: Path, D: int, F: int, declared: dict[str, tuple[Any, str]], required: bool) -> None:
    """The sizes a config declares, {key: (value, "D" | "F")}, must equal the weights' (D, F); a missing
    (None) value is refused when `required`, else skipped."""
    for key, (value, dim) in declared.items():
        actual = D if dim == "D" else F
        if value is None and not required:
            continue
        if value is None:
            raise WorkbenchError(f"{path} has no {key} (the weights say {actual}); add it or re-export the SAE")
        if type(value) is not int or value != actual:
            raise WorkbenchError(f"{path} says {key}={value!r} but the weights say {actual} (d_in {D}, d_sae {F}); the "
                                 f"folder is inconsistent: fix {key} or re-export it")


def check_k(k: Any, F: int, what: str, fix: str) -> int:
    """A training / top-k k: a whole number from 1 to F (what a TopK or BatchTopK encoder can select).
    what: where the value came from, e.g. "--k"; fix: what to do about a bad one."""
    if (isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k) or k != int(k)
            or not 1 <= k <= F):
        raise WorkbenchError(f"{what} {k!r} is not a positive integer up to d_sae={F}; {fix}")
    return int(k)


def check_dtypes(path: Path, dtypes: dict[str, torch.dtype]) -> torch.dtype:
    """The one float dtype of an SAE's weights (both formats hold one); returns it."""
    found = set(dtypes.values())
    if len(found) != 1 or not found <= set(FLOAT_DTYPES):
        have = ", ".join(f"{n} {str(d).removeprefix('torch.')}" for n, d in dtypes.items())
        raise WorkbenchError(f"{path}: the weights are {have}; an SAE converts when they all have one of float32, "
                             "float16, bfloat16, float64: cast them to one and save again")
    return found.pop()


def hook_name(layer: int) -> str:
    """The TransformerLens / SAELens hook of decoder layer `layer`'s output: blocks.<L>.hook_resid_post."""
    return f"blocks.{layer}.hook_resid_post"


@dataclass
class SAEInfo:
    """What an SAE is for, as far as the source folder says (None: not recorded).

    provenance: the workbench section (sink filter and multiple, first-token removal, normalisation
    factor, cache, threshold history; workbench.provenance), carried unchanged through every conversion.
    converted_from: the other format's own config, kept so that converting back restores it."""

    model_name: str | None = None
    layer: int | None = None
    hook_name: str | None = None
    context_size: int | None = None
    dataset_path: str | None = None
    prepend_bos: bool | None = None
    provenance: Provenance | None = None
    eval_results: dict[str, Any] | None = None
    dl_config: dict[str, Any] | None = None
    saelens_cfg: dict[str, Any] | None = None


@dataclass
class SAEWeights:
    """One SAE in the format-neutral form (see the module docstring for the math)."""

    W_enc_DF: Source
    b_enc_F: torch.Tensor
    W_dec_FD: Source
    b_dec_D: torch.Tensor
    activation: str  # jumprelu | topk | relu
    threshold_F: torch.Tensor | None = None
    k: int | None = None  # topk: per token; jumprelu trained as BatchTopK: the batch-average k
    group_sizes: list[int] | None = None  # Matryoshka nested groups
    apply_b_dec_to_input: bool = True
    rescale_acts_by_decoder_norm: bool = False  # SAELens topk only
    sparsity_F: torch.Tensor | None = None  # log10 firing frequency, SAELens' sparsity.safetensors
    info: SAEInfo = field(default_factory=SAEInfo)

    @property
    def activation_dim(self) -> int:
        return shape_of(self.W_enc_DF)[0]

    @property
    def dict_size(self) -> int:
        return shape_of(self.W_enc_DF)[1]

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.W_enc_DF)

    def constant_threshold(self) -> float | None:
        """The threshold when it is one value for every latent (a BatchTopK SAE), else None."""
        if self.threshold_F is None or self.threshold_F.numel() == 0:
            return None
        first = self.threshold_F[0]
        return float(first) if bool((self.threshold_F == first).all()) else None


class InferenceSAE(nn.Module):
    """The workbench's own inference module for any SAEWeights. It runs SAELens' operations in SAELens' order
    (x - b_dec * apply_b_dec_to_input, @ W_enc + b_enc, the activation, @ W_dec + b_dec), so on the same torch
    build, thread count and tensors it returns SAELens' outputs to the bit in practice. What holds in general,
    against SAELens and dictionary_learning alike (nn.Linear's fused addmm rounds differently), is agreement
    to fp32 rounding, and a latent whose pre-activation sits on the threshold may fire in one only: that is
    what `workbench verify` checks."""

    def __init__(self, weights: SAEWeights):
        super().__init__()
        self.activation = weights.activation
        self.k = weights.k
        self.apply_b_dec_to_input = weights.apply_b_dec_to_input
        self.rescale_acts_by_decoder_norm = weights.rescale_acts_by_decoder_norm
        self.W_enc = nn.Parameter(materialize(weights.W_enc_DF), requires_grad=False)
        self.b_enc = nn.Parameter(weights.b_enc_F.clone(), requires_grad=False)
        self.W_dec = nn.Parameter(materialize(weights.W_dec_FD), requires_grad=False)
        self.b_dec = nn.Parameter(weights.b_dec_D.clone(), requires_grad=False)
        if weights.threshold_F is not None:
            self.register_buffer("threshold", weights.threshold_F.clone())

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Latents [B, F] from activations [B, D]."""
        sae_in_BD = x_BD - self.b_dec * self.apply_b_dec_to_input
        pre_BF = sae_in_BD @ self.W_enc + self.b_enc
        if self.activation == "jumprelu":
            return torch.relu(pre_BF) * (pre_BF > self.threshold).to(pre_BF.dtype)
        if self.activation == "relu":
            return torch.relu(pre_BF)
        if self.rescale_acts_by_decoder_norm:
            pre_BF = pre_BF * self.W_dec.norm(dim=-1)
        top = pre_BF.topk(int(self.k), dim=-1, sorted=False)
        return torch.zeros_like(pre_BF).scatter_(-1, top.indices, top.values.relu())

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        """Reconstruction [B, D] from latents [B, F]."""
        if self.rescale_acts_by_decoder_norm:
            f_BF = f_BF * (1 / self.W_dec.norm(dim=-1))
        return f_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x_BD))


# ---- the file both formats keep beside their weights ----

SPARSITY_FILE = "sparsity.safetensors"  # per-latent log10 firing frequency, SAELens' file (kept beside ae.pt too)


def read_sparsity(folder: Path, F: int) -> torch.Tensor | None:
    """sparsity.safetensors beside the weights (either format): per-latent log10 firing frequency [F], or None."""
    path = folder / SPARSITY_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise WorkbenchError(f"{path} is truncated or corrupt ({str(err).splitlines()[0][:200]}); delete or re-export it") from None
    sparsity = tensors.get("sparsity")
    if sparsity is None or tuple(sparsity.shape) != (F,) or not sparsity.is_floating_point():
        have = ", ".join(f"{n} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for n, t in tensors.items()) or "nothing"
        raise WorkbenchError(f"{path} holds {have}, not a float sparsity [{F}] (one value per latent); delete or "
                             "re-export it")
    return sparsity


def write_sparsity(folder: Path, sparsity_F: torch.Tensor) -> None:
    """Write sparsity.safetensors ({"sparsity": [F]}, SAELens' file) into folder, atomically."""
    write_atomic(folder / SPARSITY_FILE, lambda fh: fh.write(safetensors_bytes({"sparsity": sparsity_F.contiguous()})))
