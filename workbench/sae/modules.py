"""The SAE modules: BatchTopK and Matryoshka BatchTopK, with dictionary_learning's state-dict contract.

State dicts (D = activation_dim, F = dict_size) match dictionary_learning 0.1.0 key for key, shape for
shape and dtype for dtype, so an `ae.pt` written by either side loads strictly in the other:

    BatchTopKSAE            b_dec [D], k [] int32, threshold [] f32, decoder.weight [D, F],
                            encoder.weight [F, D], encoder.bias [F]
    MatryoshkaBatchTopKSAE  W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], k [] int32,
                            threshold [] f32, group_sizes [n_groups] int64

The math, the same for both:
    pre_BF   = relu((x_BD - b_dec_D) @ W_enc_DF + b_enc_F)
    f_BF     = pre_BF * (pre_BF > threshold)        inference (per token, strict >)
    f_BF     = top k*B entries of pre_BF, batch-wide training (batch dependent)
    x_hat_BD = f_BF @ W_dec_FD + b_dec_D

Both modules keep W_enc and W_dec in memory as [F, D] rows (one latent's directions contiguous),
whatever the state-dict layout: the [D, F] entries (`decoder.weight`, Matryoshka's `W_enc`) are
transposed views of [F, D] storage, and `state_dict()` writes them as contiguous [D, F] tensors. The
training step's sparse products, decoder-norm projection and renormalisation then read whole rows
instead of strided columns, and no step transposes a weight.

The batch top-k selection and the sparse products training uses live in `workbench.sae.sparse`.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.sae.sparse import batch_topk, jumprelu


def unit_norm_rows(W_FD: torch.Tensor) -> torch.Tensor:
    """Each decoder direction (a row of W_dec_FD) scaled to unit L2 norm (eps as dictionary_learning)."""
    return W_FD / (W_FD.norm(dim=1, keepdim=True) + torch.finfo(W_FD.dtype).eps)


def rows_parameter(W_FD: torch.Tensor) -> nn.Parameter:
    """A [D, F] parameter held as the transposed view of contiguous [F, D] rows (autograd gives its
    gradient, and Adam its state, the same layout)."""
    return nn.Parameter(W_FD.contiguous().T)


def _contiguous_entries(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the transposed views are written as contiguous tensors (the file layout)."""
    for key, value in state.items():
        if not isinstance(value, nn.Parameter) and not value.is_contiguous():
            state[key] = value.contiguous()


class _SAEBase(nn.Module):
    """Shared math; subclasses say where W_enc, b_enc and W_dec live in their state dict."""

    activation_dim: int
    dict_size: int
    k: torch.Tensor
    threshold: torch.Tensor
    b_dec: nn.Parameter

    def _init_buffers(self, activation_dim: int, dict_size: int, k: int) -> None:
        if not (isinstance(k, int) and k > 0):
            raise ValueError(f"k must be a positive int (got {k!r})")
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.register_buffer("k", torch.tensor(k, dtype=torch.int32))
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self.register_state_dict_post_hook(_contiguous_entries)

    # Views with shape-suffixed names, whatever the storage layout.
    @property
    def W_enc_DF(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def b_enc_F(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def W_dec_FD(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def W_dec_grad_FD(self) -> torch.Tensor | None:
        """W_dec's gradient as an [F, D] view of the stored parameter's (None before a backward)."""
        raise NotImplementedError

    def hidden_pre(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) @ W_enc + b_enc, before the relu: [B, D] -> [B, F]."""
        return (x_BD - self.b_dec) @ self.W_enc_DF + self.b_enc_F

    def encoder_product(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) @ W_enc, without b_enc: [B, D] -> [B, F]. The training step adds the bias only
        to the entries it reads (`batch_topk_select(..., bias_F)`): no pass over [B, F] for it."""
        return (x_BD - self.b_dec) @ self.W_enc_DF

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """relu((x - b_dec) @ W_enc + b_enc): [B, D] -> [B, F]."""
        return torch.relu(self.hidden_pre(x_BD))

    def _mask_inactive(self, f_BF: torch.Tensor) -> torch.Tensor:
        return f_BF

    def encode(self, x_BD: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        """Latents [B, F]. use_threshold=True is the per-token JumpReLU rule (strict >), the default at
        inference; False is batch top-k over the whole batch, as in training."""
        pre_BF = self.pre_acts(x_BD)
        if use_threshold:
            f_BF = jumprelu(pre_BF, self.threshold)
        else:
            f_BF = batch_topk(pre_BF, int(self.k))
        return self._mask_inactive(f_BF)

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        """f @ W_dec + b_dec: [B, F] -> [B, D]."""
        return f_BF @ self.W_dec_FD + self.b_dec

    def forward(self, x_BD: torch.Tensor, output_features: bool = False):
        f_BF = self.encode(x_BD)
        x_hat_BD = self.decode(f_BF)
        return (x_hat_BD, f_BF) if output_features else x_hat_BD

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Fold an activation normalisation factor into the biases and threshold (dictionary_learning's
        rule): an SAE trained on x / scale then works on raw x."""
        self.b_enc_F.mul_(scale)
        self.b_dec.mul_(scale)
        if self.threshold >= 0:
            self.threshold.mul_(scale)


class BatchTopKSAE(_SAEBase):
    """dictionary_learning's BatchTopKSAE: encoder/decoder are nn.Linear layers."""

    def __init__(self, activation_dim: int, dict_size: int, k: int):
        super().__init__()
        self._init_buffers(activation_dim, dict_size, k)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        self.encoder = nn.Linear(activation_dim, dict_size)
        with torch.no_grad():
            # Decoder columns unit norm; encoder tied to the decoder at init; zero biases.
            self.decoder.weight = rows_parameter(unit_norm_rows(self.decoder.weight.T))
            self.encoder.weight.copy_(self.decoder.weight.T)
            self.encoder.bias.zero_()
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> BatchTopKSAE:
        """The module holding a state dict of this class, loaded strictly (sizes from encoder.weight [F, D])."""
        dict_size, activation_dim = state["encoder.weight"].shape
        sae = cls(activation_dim, dict_size, int(state["k"]))
        sae.load_state_dict(state, strict=True)
        return sae

    @property
    def W_enc_DF(self) -> torch.Tensor:
        return self.encoder.weight.T

    @property
    def b_enc_F(self) -> torch.Tensor:
        return self.encoder.bias

    @property
    def W_dec_FD(self) -> torch.Tensor:
        return self.decoder.weight.T

    @property
    def W_dec_grad_FD(self) -> torch.Tensor | None:
        grad = self.decoder.weight.grad
        return None if grad is None else grad.T

    def hidden_pre(self, x_BD: torch.Tensor) -> torch.Tensor:
        # nn.Linear (one fused bias-add GEMM), as dictionary_learning computes it: same rounding.
        return self.encoder(x_BD - self.b_dec)

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return self.decoder(f_BF) + self.b_dec


class MatryoshkaBatchTopKSAE(_SAEBase):
    """dictionary_learning's MatryoshkaBatchTopKSAE: nested groups of latents, W_enc/W_dec parameters.

    `active_groups` (default: all) zeroes every latent past the first `active_groups` groups, which
    gives the nested smaller dictionaries (e.g. the first 128 latents of the Gemma-3 series).
    """

    def __init__(self, activation_dim: int, dict_size: int, k: int, group_sizes: list[int]):
        super().__init__()
        if sum(group_sizes) != dict_size or any(s <= 0 for s in group_sizes):
            raise ValueError(f"group_sizes {group_sizes} must be positive and sum to dict_size {dict_size}")
        self._init_buffers(activation_dim, dict_size, k)
        self.register_buffer("group_sizes", torch.tensor(group_sizes, dtype=torch.int64))
        self.active_groups = len(group_sizes)
        W_dec_FD = unit_norm_rows(nn.init.kaiming_uniform_(torch.empty(dict_size, activation_dim)))
        self.W_enc = rows_parameter(W_dec_FD.clone())
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(W_dec_FD)
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> MatryoshkaBatchTopKSAE:
        """The module holding a state dict of this class, loaded strictly (sizes from W_enc [D, F])."""
        activation_dim, dict_size = state["W_enc"].shape
        sae = cls(activation_dim, dict_size, int(state["k"]), state["group_sizes"].tolist())
        sae.load_state_dict(state, strict=True)
        return sae

    @property
    def W_enc_DF(self) -> torch.Tensor:
        return self.W_enc

    @property
    def b_enc_F(self) -> torch.Tensor:
        return self.b_enc

    @property
    def W_dec_FD(self) -> torch.Tensor:
        return self.W_dec

    @property
    def W_dec_grad_FD(self) -> torch.Tensor | None:
        return self.W_dec.grad

    @property
    def group_bounds(self) -> list[int]:
        """Cumulative group ends: [0, s0, s0+s1, ..., F]."""
        return [0, *torch.cumsum(self.group_sizes, 0).tolist()]

    def _mask_inactive(self, f_BF: torch.Tensor) -> torch.Tensor:
        end = self.group_bounds[self.active_groups]
        if end < self.dict_size:
            f_BF = f_BF.clone()
            f_BF[:, end:] = 0
        return f_BF


def matryoshka_group_sizes(dict_size: int, group_fractions: list[float]) -> list[int]:
    """dictionary_learning's rule: int(f * F) for every fraction but the last, which takes the rest."""
    sizes = [int(f * dict_size) for f in group_fractions[:-1]]
    return [*sizes, dict_size - sum(sizes)]


SAE = BatchTopKSAE | MatryoshkaBatchTopKSAE
