"""One SAE's training step and its loss: where to change the loss, the optimiser or the schedules.

The step of dictionary_learning's BatchTopKTrainer and MatryoshkaBatchTopKTrainer (0.1.0), with its
schedules (auto_lr, lr_factor, annealed_k) and the b_dec initialisation (geometric_median). The loop
around it (data lanes, checkpoints, resume, the SAE folders) is `workbench.training.loop`.

`Trainer.update(x_BD)` is one step, the same algorithm step for step (tests/test_trainer_parity.py
proves it against the reference to 1e-5 after 1200 steps):

    step 0            b_dec := geometric median of the batch (not when fine-tuning)
    encode            pre_BF = relu((x - b_dec) @ W_enc + b_enc); keep the k*B largest entries of
                      the whole batch (k annealed from D to k over the first steps, newer dictionary_learning)
    threshold         for step > threshold_start_step: EMA (beta 0.999) of the smallest kept value
    loss              ||x - x_hat||^2 summed over D, mean over the batch (Matryoshka: the mean over
                      groups of weight_i * that loss for the reconstruction from groups 0..i)
                      + auxk_alpha * aux-k loss (top D/2 dead latents reconstruct the residual)
                      (`Trainer.update`, `_reconstruct`, `_auxk_loss`)
    dead latents      a latent not kept for dead_feature_threshold tokens is dead
    after backward    drop the gradient along each decoder direction, clip the norm at 1, Adam with
                      warmup and linear decay, decoder directions back to unit norm

It differs from the reference only in how it computes: the kept entries are found without a full
top-k, the encoder bias is added only to the entries the selections read, the codes are decoded
sparsely, forward and backward (see `workbench.sae.sparse`), and under data parallelism
the selection, the threshold and the dead counters come from the global batch (`workbench.dist.Comm`).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys

import torch

from workbench.dist import Comm
from workbench.sae import SAE, Kept, auxk_select, batch_topk_select, decode_kept, encode_kept
from workbench.sae.registry import architecture_of


def auto_lr(dict_size: int) -> float:
    """dictionary_learning's default: 2e-4 / sqrt(F / 2^14) (the 1/sqrt(F) scaling law)."""
    return 2e-4 / (dict_size / 2**14) ** 0.5


def lr_factor(step: int, steps: int, warmup_steps: int, decay_start: int | None) -> float:
    """Learning-rate multiplier at a step: linear warmup from 0, then 1, then linear decay to 0."""
    if step < warmup_steps:
        return step / warmup_steps
    if decay_start is not None and step >= decay_start:
        return (steps - step) / (steps - decay_start)
    return 1.0


def annealed_k(step: int, k: int, activation_dim: int, anneal_steps: int | None) -> int:
    """k at a step: int(D * (1 - r) + k * r), r = min(step, K) / K; k itself when off (K None or 0)."""
    if not anneal_steps or activation_dim <= k:
        return k
    r = min(step, anneal_steps) / anneal_steps
    return int(activation_dim * (1 - r) + k * r)


@torch.no_grad()
def geometric_median(points_ND: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld iterations from the mean, as dictionary_learning's b_dec initialisation: [N, D] -> [D]."""
    guess_D = points_ND.mean(dim=0)
    for _ in range(max_iter):
        previous_D = guess_D
        weights_N = 1 / torch.norm(points_ND - guess_D, dim=1)
        weights_N /= weights_N.sum()
        guess_D = (weights_N.unsqueeze(1) * points_ND).sum(dim=0)
        if torch.norm(guess_D - previous_D) < tol:
            break
    return guess_D


class _PrefixSums(torch.autograd.Function):
    """b_dec + parts[:, 0], b_dec + parts[:, 0] + parts[:, 1], ...: G tensors [B, D] from parts [B, G, D].

    The rounding of `torch.cat([b_dec, parts], 1).cumsum(1)` on CPU (a float64 running sum, its
    backward the reversed running sum, float64 too), the step's parity with dictionary_learning as
    measured with it, by one [B, D] slice at a time: the cumsum over the strided [B, G, D] layout and
    its flipped backward took a quarter of a Matryoshka step (measured at F 4096).
    """

    @staticmethod
    def forward(ctx, b_dec_D, parts_BGD):
        ctx.G = parts_BGD.shape[1]
        running_BD = b_dec_D.double().expand(parts_BGD.shape[0], -1)
        prefixes = []
        for g in range(ctx.G):
            running_BD = running_BD + parts_BGD[:, g]
            prefixes.append(running_BD.float())
        return tuple(prefixes)

    @staticmethod
    def backward(ctx, *grads_BD):
        g_parts_BGD = torch.empty(grads_BD[0].shape[0], ctx.G, grads_BD[0].shape[1], dtype=grads_BD[0].dtype,
                                  device=grads_BD[0].device)
        running_BD = grads_BD[-1].double()
        for g in range(ctx.G - 1, -1, -1):
            if g < ctx.G - 1:
                running_BD = running_BD + grads_BD[g]
            g_parts_BGD[:, g] = running_BD
        return running_BD.float().sum(dim=0), g_parts_BGD


def prefix_sums(b_dec_D: torch.Tensor, parts_BGD: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The G cumulative reconstructions [B, D] of a grouped code's parts [B, G, D], from b_dec (`_PrefixSums`)."""
    return _PrefixSums.apply(b_dec_D, parts_BGD)


def _row_chunks(*tensors_FD: torch.Tensor) -> zip:
    """The [F, D] tensors split into the same blocks of rows, 1 MiB of float32 a block on CPU: the
    decoder-norm projection is row by row, and a block's rows stay in the cache from one of its
    operations to the next instead of each reading all of [F, D] from memory (the same values; 1.4x
    faster at F 4096 and 65536, measured). One block elsewhere."""
    F, D = tensors_FD[0].shape
    rows = max(1, (1 << 18) // D) if tensors_FD[0].device.type == "cpu" else F
    return zip(*(t.split(rows) for t in tensors_FD), strict=True)


def _keep_freed_memory() -> None:
    """Let glibc keep the process's freed memory for its next allocations instead of handing it back.

    A step allocates and frees the same large tensors every step (the [B, F] encoder product and
    masks, [F, D] gradients). By default glibc maps each one above its threshold fresh from the system
    and unmaps it when freed, and every 4 KiB page of it then faults on first touch: ~1900 faults a
    step at F 4096, ~3000 with every latent dead, and at F 16384 a quarter of the encoder product's
    time (measured). Process-wide (memory freed by the step stays with the process); nothing off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


class Trainer:
    """One SAE's optimisation: Adam, the schedules, dead-latent counters and the threshold EMA.

    Hyperparameters carry dictionary_learning's names and defaults. `fine_tune` keeps the loaded
    weights: no b_dec initialisation, no k annealing; the threshold continues from its value.
    """

    def __init__(self, sae: SAE, steps: int, *, lr: float | None = None, warmup_steps: int = 1000,
                 decay_start: int | None = None, k_anneal_steps: int | None = None, auxk_alpha: float = 1 / 32,
                 threshold_beta: float = 0.999, threshold_start_step: int = 1000,
                 dead_feature_threshold: int = 10_000_000, group_weights: list[float] | None = None,
                 fine_tune: bool = False, autocast_dtype: torch.dtype | None = None, comm: Comm | None = None):
        if not 0 <= warmup_steps < steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be >= 0 and < steps ({steps})")
        if decay_start is not None and not warmup_steps < decay_start < steps:
            raise ValueError(f"decay_start ({decay_start}) must be > warmup_steps ({warmup_steps}) and < steps ({steps})")
        self.sae, self.steps = sae, steps
        self.k = int(sae.k)
        self.lr = lr if lr is not None else auto_lr(sae.dict_size)
        self.warmup_steps, self.decay_start = warmup_steps, decay_start
        self.k_anneal_steps = None if fine_tune else k_anneal_steps
        self.auxk_alpha, self.top_k_aux = auxk_alpha, sae.activation_dim // 2
        self.threshold_beta, self.threshold_start_step = threshold_beta, threshold_start_step
        self.dead_feature_threshold = dead_feature_threshold
        self.fine_tune = fine_tune
        self.autocast_dtype = autocast_dtype
        self.comm = comm or Comm()
        self.group_weights = None  # the Matryoshka prefix losses' weights; None: one loss, no groups
        if architecture_of(sae).grouped:
            n_groups = len(sae.group_sizes)
            self.group_weights = group_weights or [1.0 / n_groups] * n_groups
            if len(self.group_weights) != n_groups:
                raise ValueError(f"{len(self.group_weights)} group weights for {n_groups} groups")
        device = sae.b_dec.device
        if device.type == "cpu":
            _keep_freed_memory()
        # Adam steps each parameter as its contiguous storage (W_dec's [F, D] rows, not the [D, F] view
        # of the state dict): the fused kernel copies a strided parameter in and out every step.
        self._params = list(sae.parameters())
        self._transposed = [not p.is_contiguous() for p in self._params]  # a [D, F] view of [F, D] rows
        self._storage = [p.detach().T if t else p for p, t in zip(self._params, self._transposed, strict=True)]
        self.optimizer = torch.optim.Adam(self._storage, lr=self.lr, betas=(0.9, 0.999),
                                          fused=device.type in ("cpu", "cuda"))
        self.step = 0
        self.num_tokens_since_fired = torch.zeros(sae.dict_size, dtype=torch.long, device=device)
        self.dead = 0  # latents dead at the last step
        # The first step (1-based) whose loss was NaN or Inf, 0 while none was: kept on the device so
        # that watching for it costs no synchronisation a step (read by `nonfinite_step`).
        self._nonfinite_at = torch.zeros((), dtype=torch.long, device=device)

    def update(self, x_BD: torch.Tensor, log: bool = False) -> dict[str, float]:
        """One step on this process's share x_BD [B, D] of the global batch (already normalised).

        Returns the step's statistics over the global batch when `log` (loss, mse, auxk_loss, l0,
        frac_variance_explained, dead, threshold, lr, k), else {}.
        """
        sae, step, comm = self.sae, self.step, self.comm
        B = x_BD.shape[0] * comm.world_size
        if step == 0 and not self.fine_tune:
            sae.b_dec.data.copy_(geometric_median(comm.cat(x_BD)))

        k = annealed_k(step, self.k, sae.activation_dim, self.k_anneal_steps)
        kept, x_hat_BD, mse, auxk = self._losses(x_BD, k, B)
        loss = mse + self.auxk_alpha * auxk
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite_at = torch.where(bad & (self._nonfinite_at == 0), step + 1, self._nonfinite_at)
        loss.backward()

        # Gradient step on the sphere of unit decoder directions.
        params = self._params
        self._average_gradients(params)
        W_dec_FD, grad_FD = sae.W_dec_FD, sae.W_dec_grad_FD
        with torch.no_grad():
            # grad -= <grad, u> u for u = W / (|W| + 1e-6), as one coefficient a row.
            for g_RD, W_RD in _row_chunks(grad_FD, W_dec_FD):
                coef_R = torch.linalg.vecdot(g_RD, W_RD) / (W_RD.norm(dim=1) + 1e-6).square()
                g_RD.addcmul_(coef_R[:, None], W_RD, value=-1.0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = self.lr * lr_factor(step, self.steps, self.warmup_steps, self.decay_start)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for p, storage, transposed in zip(params, self._storage, self._transposed, strict=True):
            storage.grad = p.grad.T if transposed else p.grad
        self.optimizer.step()
        for p, storage in zip(params, self._storage, strict=True):
            p.grad = storage.grad = None
        with torch.no_grad():
            W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True) + torch.finfo(W_dec_FD.dtype).eps
        self.step += 1
        if not log:
            return {}
        return self._log(x_BD, x_hat_BD, kept, loss, mse, auxk, lr, k)

    def _losses(self, x_BD: torch.Tensor, k: int, B: int) -> tuple[Kept, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Select, update the threshold and the dead counters, and compute the step's two losses:
        (kept, x_hat [B, D], reconstruction loss, aux-k loss).

        The main and the aux-k codes are encoded and decoded by products of their own, as the reference's
        two autograd paths: one product over both would sum each weight's gradient in another order,
        enough to flip a latent at the batch top-k cut within the parity test's 1200 steps (measured)."""
        sae, comm = self.sae, self.comm
        # Encode: dense pre-activations without autograd; the global batch top-k as an index set.
        # Before the relu and without b_enc: the selection keeps positives only and adds the bias to
        # the entries it reads.
        with torch.no_grad(), self._autocast():
            product_BF = sae.encoder_product(x_BD).float()
        b_enc_F = sae.b_enc_F.detach()
        kept, vals_N = batch_topk_select(product_BF, k * B, comm, b_enc_F)
        f_N = encode_kept(sae, x_BD, vals_N, kept)
        if self.step > self.threshold_start_step:
            self._update_threshold(vals_N)
        x_hat_BD, mse = self._reconstruct(x_BD, f_N, kept)
        fired_F = comm.sum(torch.bincount(kept.cols, minlength=sae.dict_size)) > 0
        self.num_tokens_since_fired += B
        self.num_tokens_since_fired[fired_F] = 0

        # The aux-k code: each token's top min(D/2, n_dead) dead latents reconstruct the residual.
        dead_M = torch.nonzero(self.num_tokens_since_fired >= self.dead_feature_threshold).squeeze(1)
        self.dead = dead_M.numel()
        if not self.dead:
            return kept, x_hat_BD, mse, mse.new_zeros(())
        aux_kept, aux_vals_N = auxk_select(product_BF, dead_M, self.top_k_aux, b_enc_F)
        recon_BD = decode_kept(encode_kept(sae, x_BD, aux_vals_N, aux_kept), sae.W_dec_FD, aux_kept)
        return kept, x_hat_BD, mse, self._auxk_loss((x_BD - x_hat_BD).detach(), recon_BD)

    def _reconstruct(self, x_BD: torch.Tensor, f_N: torch.Tensor, kept: Kept) -> tuple[torch.Tensor, torch.Tensor]:
        """x_hat [B, D] and the reconstruction loss (Matryoshka: mean of the weighted prefix losses)."""
        sae = self.sae
        if self.group_weights is None:
            x_hat_BD = decode_kept(f_N, sae.W_dec_FD, kept) + sae.b_dec
            return x_hat_BD, (x_BD - x_hat_BD).pow(2).sum(dim=-1).mean()
        # Reconstruction from groups 0..i for every i: b_dec plus the cumulative sum of the groups' parts.
        (B, D), G = x_BD.shape, len(self.group_weights)
        parts_BGD = decode_kept(f_N, sae.W_dec_FD, kept.by_group(sae.group_bounds)).view(B, G, D)
        prefixes = prefix_sums(sae.b_dec, parts_BGD)
        losses_G = torch.stack([(x_BD - r_BD).pow(2).sum(dim=-1).mean() for r_BD in prefixes])
        weights_G = torch.tensor(self.group_weights, dtype=losses_G.dtype, device=losses_G.device)
        return prefixes[-1], (losses_G * weights_G).mean()

    def _auxk_loss(self, residual_BD: torch.Tensor, recon_BD: torch.Tensor) -> torch.Tensor:
        """The aux-k code's reconstruction recon_BD (no b_dec) of the residual, normalised by the
        residual's variance around its batch mean (OpenAI's rule); NaN -> 0."""
        comm = self.comm
        l2_aux = (residual_BD - recon_BD).pow(2).sum(dim=-1).mean()
        mu_D = comm.batch_mean(residual_BD)
        denominator = comm.batch_mean((residual_BD - mu_D).pow(2).sum(dim=-1))
        return (l2_aux / denominator).nan_to_num(0.0)

    def nonfinite_step(self) -> int | None:
        """The first step (1-based) at which the loss of any process was NaN or Inf, or None. A
        collective under data parallelism: every process must call it at the same step."""
        at_W = self.comm.cat(self._nonfinite_at.reshape(1))
        bad_W = at_W[at_W > 0]
        return int(bad_W.min()) if bad_W.numel() else None

    def _update_threshold(self, vals_N: torch.Tensor) -> None:
        """EMA of the smallest kept (positive) value of the global batch; a batch with none counts 0."""
        local_min = vals_N.min() if vals_N.numel() else vals_N.new_tensor(math.inf)
        smallest = self.comm.cat(local_min.reshape(1)).min()
        smallest = torch.where(torch.isinf(smallest), 0.0, smallest).float()
        threshold = self.sae.threshold
        if threshold < 0:
            threshold.copy_(smallest)
        else:
            threshold.copy_(self.threshold_beta * threshold + (1 - self.threshold_beta) * smallest)

    def _average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every parameter gets a gradient (zeros where nothing reached it, as the dense reference);
        across processes the gradients are averaged in one flat all-reduce."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.comm.average_gradients(params)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.sae.b_dec.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def _log(self, x_BD, x_hat_BD, kept: Kept, loss, mse, auxk, lr: float, k: int) -> dict[str, float]:
        comm = self.comm
        scalars = comm.mean(torch.stack([loss.detach(), mse.detach(), auxk.detach(),
                                         torch.tensor(len(kept) / x_BD.shape[0], device=x_BD.device)]))
        # Variance explained as dictionary_learning logs it: 1 - sum_d var(x - x_hat) / sum_d var(x).
        moments = comm.sum(torch.stack([x_BD.sum(0), x_BD.pow(2).sum(0), (x_BD - x_hat_BD).sum(0),
                                        (x_BD - x_hat_BD).pow(2).sum(0)]).double())
        n = x_BD.shape[0] * comm.world_size
        var_x = (moments[1] - moments[0] ** 2 / n).sum()
        var_e = (moments[3] - moments[2] ** 2 / n).sum()
        loss_v, mse_v, auxk_v, l0 = scalars.tolist()
        return {"loss": loss_v, "mse": mse_v, "auxk_loss": auxk_v, "l0": l0,
                "frac_variance_explained": float(1 - var_e / var_x), "dead": self.dead,
                "threshold": float(self.sae.threshold), "lr": lr, "k": k}

    def state_dict(self) -> dict:
        """The SAE, Adam (its moments in each parameter's shape, as the state dict has it), the step and
        the dead-latent counters."""
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {key: value.T if self._transposed[i] and value.dim() == 2 else value
                                  for key, value in p_state.items()} for i, p_state in optimizer["state"].items()}
        return {"sae": self.sae.state_dict(), "optimizer": optimizer, "step": self.step,
                "num_tokens_since_fired": self.num_tokens_since_fired.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        # The moments are saved in each parameter's shape (a checkpoint from before the [F, D] storage: as
        # contiguous [D, F] rows); Adam holds them in its storage's layout. Copies, all of them: Adam
        # updates its state in place, and the state given must not change with it.
        for storage, transposed in zip(self._storage, self._transposed, strict=True):
            p_state = self.optimizer.state.get(storage, {})
            for key, value in p_state.items():
                if value.dim() == 0:
                    p_state[key] = value.clone()
                else:
                    p_state[key] = torch.empty_like(storage).copy_(value.T if transposed else value)
        self.step = int(state["step"])
        self.num_tokens_since_fired.copy_(state["num_tokens_since_fired"])
