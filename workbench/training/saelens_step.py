"""SAELens' training step (train.algorithm saelens): the algorithm that made the Gemma-3-1b Matryoshka series.

sae-lens 6.54.12's `SAETrainer._train_step` on a `BatchTopKTrainingSAE` or `MatryoshkaBatchTopKTrainingSAE`,
step for step (tests/test_saelens_trainer_parity.py proves it against the package), on the workbench's own
SAE modules. It has the interface of `workbench.training.step.Trainer` (update, nonfinite_step, state_dict),
so the loop, the lanes, checkpoints and resume are shared. The settings are `train.saelens`
(`workbench.config.SAELensTrainConfig`: SAELens' names and defaults).

    init              W_dec rows kaiming-uniform, scaled to norm decoder_init_norm (0.1); W_enc = W_dec^T;
                      zero biases (`init_weights_`)
    encode            hidden_pre_BF = ((x - b_dec) @ W_enc + b_enc) * |W_dec row| (rescale_acts_by_decoder_norm);
                      keep the k*B largest entries of relu(hidden_pre) over the whole batch
    decode            x_hat = (f / |W_dec row|) @ W_dec + b_dec
    loss              ||x - x_hat||^2 summed over D, mean over the batch; Matryoshka adds, unweighted, the same
                      loss of each inner level's reconstruction (b_dec + the latents below its width)
                      + aux_loss_coefficient (1.0) * min(n_dead / (D/2), 1) * aux loss: the top min(D/2, n_dead)
                      dead hidden_pre of each token reconstruct the detached residual (no b_dec, no variance
                      normalisation); Matryoshka's use_matryoshka_aux_loss: one such loss per level, on that
                      level's dead latents and residual, summed
    dead latents      a latent that has not fired for more than dead_feature_window (1000) steps
    threshold         topk_threshold (float64, from 0.0 at step 0): EMA with rate topk_threshold_lr (0.01) of
                      the smallest positive kept value; a batch where nothing fired leaves it
    after backward    clip the gradient norm at 1, Adam (betas 0.9, 0.999), then SAELens' lr schedule
                      (constant by default; linear warmup and decay, cosine annealing); no decoder
                      renormalisation, no gradient projection
    at the end        `fold_for_inference`: the activation scaling, then the decoder norms folded into
                      W_enc and b_enc (unit W_dec rows), threshold = topk_threshold: the JumpReLU SAE that
                      SAELens' save_inference_model writes

Two forms compute the losses (train.saelens.exact): `_exact_losses`, SAELens' own dense operations in its
order, the same weights as sae-lens bit for bit; `_sparse_losses`, the same math with the sparse products of
`workbench.sae.sparse` over the kept entries (tests/test_saelens_sparse_step.py: each step the exact step to
float rounding), 5-6x faster at B 1024 / F 4096 (bench/train_bench.py).

Unlike dictionary_learning (`workbench.training.step`), the decoder rows are free during training and the
latents are measured in units of their decoder norms; the module's encode/decode are the inference math only
after `fold_for_inference`. Under data parallelism the batch top-k, the threshold and the dead counters come
from the global batch (`workbench.dist.Comm`) and the gradients are averaged.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
from torch.nn.functional import mse_loss
from torch.optim import lr_scheduler

from workbench.config import SAELensTrainConfig
from workbench.dist import Comm
from workbench.sae import SAE, Kept, auxk_select, batch_topk_select, decode_kept
from workbench.sae.registry import architecture_of
from workbench.sae.sparse import encode_kept_with
from workbench.training.step import prefix_sums


@torch.no_grad()
def init_weights_(sae: SAE, decoder_init_norm: float | None = 0.1) -> None:
    """SAELens' TrainingSAE initialisation, drawn from torch's global RNG as SAELens draws it: W_dec [F, D]
    kaiming-uniform, each row scaled to norm decoder_init_norm (None: as drawn), W_enc = W_dec^T, zero biases."""
    W_dec_FD = torch.nn.init.kaiming_uniform_(torch.empty(sae.dict_size, sae.activation_dim, device=sae.b_dec.device))
    if decoder_init_norm is not None:
        W_dec_FD /= W_dec_FD.norm(dim=-1, keepdim=True)
        W_dec_FD *= decoder_init_norm
    sae.W_dec_FD.copy_(W_dec_FD)
    sae.W_enc_DF.copy_(W_dec_FD.T)
    sae.b_enc_F.zero_()
    sae.b_dec.zero_()


@torch.no_grad()
def scaling_factor(batches: Iterable[torch.Tensor], d_in: int, n_batches: int) -> float:
    """SAELens' expected_average_only_in factor: sqrt(d_in) / the mean L2 norm of the tokens of the first
    n_batches batches (the input is multiplied by it, so the mean norm becomes sqrt(d_in))."""
    total, count = 0.0, 0
    for i, x_BD in enumerate(batches):
        if i == n_batches:
            break
        norms_B = x_BD.norm(dim=-1)
        total += norms_B.float().sum().item()
        count += norms_B.numel()
    if count == 0:
        raise ValueError("no batch to estimate the scaling factor from")
    return d_in**0.5 / (total / count)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, *, lr: float, warm_up_steps: int, decay_steps: int,
                      training_steps: int, lr_end: float, num_cycles: int) -> lr_scheduler.LRScheduler:
    """SAELens' schedule (sae_lens.training.optim.get_lr_scheduler), from torch's schedulers: linear warmup
    from lr / warm_up_steps over warm_up_steps; the main schedule (constant, or cosine annealing to lr_end,
    with num_cycles warm restarts); a linear decay to 0 over the last decay_steps, from lr_end (constant: lr)."""
    main_steps = training_steps - warm_up_steps - decay_steps
    if name == "constant":
        main = lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda _: 1.0)
        lr_end = lr  # the decay starts where the constant schedule is
    elif name == "cosineannealing":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps, eta_min=lr_end)
    elif name == "cosineannealingwarmrestarts":
        main = lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=main_steps // num_cycles, eta_min=lr_end)
    else:
        raise ValueError(f"unknown lr scheduler {name!r}")
    phases, milestones = [], []
    if warm_up_steps > 0:
        phases.append(lr_scheduler.LinearLR(optimizer, start_factor=1 / warm_up_steps, end_factor=1.0,
                                            total_iters=warm_up_steps - 1))
        milestones.append(warm_up_steps)
    phases.append(main)
    if decay_steps > 0:
        phases.append(lr_scheduler.LinearLR(optimizer, start_factor=lr_end / lr, end_factor=0.0, total_iters=decay_steps))
        milestones.append(training_steps - decay_steps)
    return lr_scheduler.SequentialLR(optimizer, schedulers=phases, milestones=milestones)


class SAELensTrainer:
    """One SAE's optimisation as SAELens' SAETrainer does it: Adam, its lr schedule, the step-counted dead
    latents and the float64 topk_threshold EMA. `settings` is train.saelens; `fine_tune` continues from a
    loaded (folded) SAE and its threshold instead of initialising.

    The trainer optimises its own copy of the weights in SAELens' layout and order (b_dec [D], W_dec [F, D],
    W_enc [D, F], b_enc [F], each contiguous), so that every product, reduction and the clipping norm runs
    on the memory layouts SAELens' runs on; the module `sae` receives them at `fold_for_inference`."""

    k_anneal_steps = None  # SAELens has no k annealing (read by the loop's config.json)
    group_weights = None  # its Matryoshka levels' losses are added unweighted

    def __init__(self, sae: SAE, steps: int, settings: SAELensTrainConfig | None = None, *, fine_tune: bool = False,
                 autocast_dtype: torch.dtype | None = None, comm: Comm | None = None):
        s = settings or SAELensTrainConfig()
        if s.lr_warm_up_steps + s.lr_decay_steps > steps:
            raise ValueError(f"lr_warm_up_steps + lr_decay_steps ({s.lr_warm_up_steps} + {s.lr_decay_steps}) exceed "
                             f"the {steps} steps")
        self.sae, self.steps, self.settings = sae, steps, s
        self.k, self.lr = int(sae.k), s.lr
        self.fine_tune, self.autocast_dtype = fine_tune, autocast_dtype
        self.comm = comm or Comm()
        # Matryoshka levels: cumulative widths, the last = F (SAELens' matryoshka_widths)
        self.widths = sae.group_bounds[1:] if architecture_of(sae).grouped else None
        self.params = {name: torch.nn.Parameter(value.detach().contiguous().clone()) for name, value in
                       (("b_dec", sae.b_dec), ("W_dec", sae.W_dec_FD), ("W_enc", sae.W_enc_DF), ("b_enc", sae.b_enc_F))}
        device = sae.b_dec.device
        # SAELens' Adam (the foreach kernels) for the exact form; the sparse form, equal only to float rounding
        # anyway, takes the fused kernel (a fifth of the time on CPU, measured)
        fused = not s.exact and device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(self.params.values(), lr=s.lr, betas=(s.adam_beta1, s.adam_beta2), fused=fused)
        self.scheduler = make_lr_scheduler(self.optimizer, s.lr_scheduler_name, lr=s.lr, warm_up_steps=s.lr_warm_up_steps,
                                           decay_steps=s.lr_decay_steps, training_steps=steps,
                                           lr_end=s.lr / 10 if s.lr_end is None else s.lr_end,
                                           num_cycles=s.n_restart_cycles)
        self.step = 0
        self.n_forward_passes_since_fired = torch.zeros(sae.dict_size, dtype=torch.long, device=device)
        start = float(sae.threshold) if fine_tune and float(sae.threshold) >= 0 else 0.0
        self.topk_threshold = torch.tensor(start, dtype=torch.float64, device=device)
        self.dead = 0  # latents dead after the last step
        self._nonfinite_at = torch.zeros((), dtype=torch.long, device=device)  # as Trainer's: no sync a step

    def update(self, x_BD: torch.Tensor, log: bool = False) -> dict[str, float]:
        """One step on this process's share x_BD [B, D] of the global batch (already scaled). Returns the
        step's statistics over the global batch when `log` (loss, mse, auxk_loss, l0,
        frac_variance_explained, dead, threshold, lr, k), else {}.

        The losses come from `_exact_losses` (train.saelens.exact, the default) or `_sparse_losses`; the
        threshold, the dead counters, clipping, Adam and the schedule are the same for both."""
        dead_F = self.dead_mask()  # before this step's update
        losses = self._exact_losses if self.settings.exact else self._sparse_losses
        loss, mse, aux, x_hat_BD, n_kept, fired_F, smallest = losses(x_BD, dead_F)
        with torch.no_grad():
            self._update_threshold(smallest)
            self.n_forward_passes_since_fired += 1
            self.n_forward_passes_since_fired[fired_F] = 0
        P, comm = self.params, self.comm
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite_at = torch.where(bad & (self._nonfinite_at == 0), self.step + 1, self._nonfinite_at)
        loss.backward()
        params = list(P.values())
        for p in params:  # zeros where nothing reached a parameter, as SAELens' dense products give
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif not p.grad.is_contiguous():  # W_enc's gradient comes as a [D, F] view of [F, D] rows
                p.grad = p.grad.contiguous()
        comm.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.step += 1
        self.dead = int(self.dead_mask().sum())
        if not log:
            return {}
        return self._log(x_BD, x_hat_BD, n_kept, loss, mse, aux, lr)

    def _exact_losses(self, x_BD: torch.Tensor, dead_F: torch.Tensor) -> tuple:
        """SAELens' own operations (dense [B, F] products), in its order, each decoder norm computed where SAELens
        computes one, so that autograd accumulates the gradients in the same order: the same weights as sae-lens
        bit for bit. Returns (loss, mse, aux, x_hat, kept entries, fired latents [F], smallest kept value)."""
        s, P = self.settings, self.params
        W_dec_FD, b_dec_D = P["W_dec"], P["b_dec"]
        with self._autocast():
            # SAELens subtracts b_dec * apply_b_dec_to_input (True): the same node, so the same gradient order
            hidden_pre_BF = (x_BD - b_dec_D * True) @ P["W_enc"] + P["b_enc"]
            if s.rescale_acts_by_decoder_norm:
                hidden_pre_BF = hidden_pre_BF * W_dec_FD.norm(dim=-1)
            f_BF, fired_F, smallest = self._batch_topk(hidden_pre_BF)
            x_hat_BD = self._unit_latents(f_BF) @ W_dec_FD + b_dec_D
            mse = mse_loss(x_hat_BD, x_BD, reduction="none").sum(dim=-1).mean()
            if self.widths is not None and s.use_matryoshka_aux_loss:
                aux = self._exact_matryoshka_aux_loss(x_BD, f_BF, hidden_pre_BF, dead_F)
            else:
                aux = self._exact_aux_loss(x_BD, x_hat_BD, hidden_pre_BF, dead_F)
            loss = mse + aux
            if self.widths is not None:  # the outer level is x_hat itself
                for _, _, inner_BD in self._exact_levels(f_BF, outer=False):
                    loss = loss + mse_loss(inner_BD, x_BD, reduction="none").sum(dim=-1).mean()
        return loss, mse, aux, x_hat_BD, int((f_BF != 0).sum()), fired_F, smallest

    def _sparse_losses(self, x_BD: torch.Tensor, dead_F: torch.Tensor) -> tuple:
        """SAELens' math computed sparsely (train.saelens.exact false): the pre-activations densely and without
        autograd, the batch top-k as an index set, and the encoder and decoder products, forward and backward,
        over the kept entries only (`workbench.sae.sparse`). With rescaled acts, a kept latent's code is
        hidden_pre / |W_dec row|, its plain pre-activation: the decoder norm it is multiplied by and divided by
        cancels (so does its gradient), and the norms only rank the entries. Returns what `_exact_losses` does."""
        comm = self.comm
        hidden_BF, inv_norm_F = self._hidden_pre(x_BD)
        kept, vals_N = batch_topk_select(hidden_BF, self.k * x_BD.shape[0] * comm.world_size, comm)
        levels = self._sparse_levels(self._encode(x_BD, kept, vals_N, inv_norm_F), kept)
        x_hat_BD = levels[-1]
        mse = _mse(x_hat_BD, x_BD)
        if self.widths is not None and self.settings.use_matryoshka_aux_loss:
            aux = self._sparse_matryoshka_aux_loss(x_BD, levels, hidden_BF, inv_norm_F, dead_F)
        else:
            aux = self._sparse_aux_loss(x_BD, x_hat_BD, hidden_BF, inv_norm_F, dead_F)
        loss = mse + aux
        for inner_BD in levels[:-1]:  # Matryoshka: each inner level's loss, unweighted
            loss = loss + _mse(inner_BD, x_BD)
        with torch.no_grad():
            fired_F = comm.sum(torch.bincount(kept.cols, minlength=hidden_BF.shape[1])) > 0
            local_min = vals_N.min() if len(kept) else vals_N.new_tensor(torch.inf)
            smallest = comm.cat(local_min.reshape(1)).min()
        return loss, mse, aux, x_hat_BD, len(kept), fired_F, smallest

    def _unit_latents(self, f_BF: torch.Tensor) -> torch.Tensor:
        """Latents in units of unit decoder rows: f / |W_dec row| with rescaled acts, else f."""
        if not self.settings.rescale_acts_by_decoder_norm:
            return f_BF
        return f_BF * (1 / self.params["W_dec"].norm(dim=-1))

    def _batch_topk(self, hidden_pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The code f_BF [B, F]: the k*B largest entries of relu(hidden_pre) over the global batch (B: the global
        batch), zeros elsewhere; with the latents that fired in the global batch [F] and the smallest positive
        kept value (inf when none).

        In one process the kept set is `batch_topk_select`'s, exactly topk's minus its zeros (which carry neither
        value nor gradient) found without a full topk, and f is scattered from hidden_pre's entries there: the
        same values and, through autograd, the same gradients as SAELens' relu, topk and scatter, bit for bit.
        Across processes each keeps its own local top k*B; the global top k*B of those candidates is the rule
        (every global winner is among its process's candidates)."""
        comm = self.comm
        B, F = hidden_pre_BF.shape
        flat_N = hidden_pre_BF.flatten()
        if comm.world_size == 1:
            kept, _ = batch_topk_select(hidden_pre_BF.detach(), self.k * B)
            idx_N = kept.rows * F + kept.cols
            vals_N = flat_N.index_select(0, idx_N)
            f_BF = torch.zeros_like(flat_N).scatter_(0, idx_N, vals_N).view(B, F)
            fired_F = torch.zeros(F, dtype=torch.bool, device=flat_N.device).index_fill_(0, kept.cols, True)
            smallest = vals_N.detach().min() if len(kept) else flat_N.new_tensor(torch.inf)
            return f_BF, fired_F, smallest
        flat_N = flat_N.relu()
        vals_N, idx_N = flat_N.topk(min(self.k * B * comm.world_size, flat_N.numel()))
        n = vals_N.numel()
        winners = comm.cat(vals_N.detach()).topk(self.k * B * comm.world_size).indices
        mine = winners[(winners >= comm.rank * n) & (winners < (comm.rank + 1) * n)] - comm.rank * n
        vals_N, idx_N = vals_N[mine], idx_N[mine]
        f_BF = torch.zeros_like(flat_N).scatter(-1, idx_N, vals_N).view(B, F)
        with torch.no_grad():
            fired_F = comm.sum((f_BF != 0).sum(dim=0)) > 0
            positive = vals_N[vals_N > 0]
            local_min = positive.min() if positive.numel() else flat_N.new_tensor(torch.inf)
            smallest = comm.cat(local_min.detach().reshape(1)).min()
        return f_BF, fired_F, smallest

    def _exact_levels(self, f_BF: torch.Tensor, outer: bool) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, width, reconstruction [B, D]) of each Matryoshka level in turn, the outer one only when
        `outer`: b_dec plus the latents below its width, cumulatively. Lazy, as SAELens' _iterable_decode: each
        level's graph is built after the previous level's loss.

        The latents are split into one view a level (SAELens slices them): the same products, and their
        gradients, disjoint, join in one concatenation instead of a zero-padded [B, F] copy a level summed up."""
        latents_BF, W_dec_FD = self._unit_latents(f_BF), self.params["W_dec"]
        starts = [0, *self.widths[:-1]]
        groups = latents_BF.split([width - start for start, width in zip(starts, self.widths, strict=True)], dim=1)
        decoded_BD = self.params["b_dec"]
        for start, width, group_BW in zip(starts, self.widths if outer else self.widths[:-1], groups, strict=False):
            decoded_BD = group_BW @ W_dec_FD[start:width] + decoded_BD
            yield start, width, decoded_BD

    def _exact_aux_loss(self, x_BD, x_hat_BD, hidden_pre_BF, dead_F) -> torch.Tensor:
        """coefficient * min(n_dead / k_aux, 1) * ||residual - top-k_aux dead latents' reconstruction||^2."""
        n_dead = int(dead_F.sum())
        if n_dead == 0:
            return x_hat_BD.new_zeros(())
        residual_BD = (x_BD - x_hat_BD).detach()
        k_aux = x_BD.shape[-1] // 2
        scale = min(n_dead / k_aux, 1.0)
        aux_BF = self._dead_topk(hidden_pre_BF, dead_F, min(k_aux, n_dead))
        l2 = (self._unit_latents(aux_BF) @ self.params["W_dec"] - residual_BD).pow(2).sum(dim=-1).mean()
        return self.settings.aux_loss_coefficient * scale * l2

    def _exact_matryoshka_aux_loss(self, x_BD, f_BF, hidden_pre_BF, dead_F) -> torch.Tensor:
        """Matryoshka's own aux loss: per level, its dead latents reconstruct that level's residual; summed."""
        if int(dead_F.sum()) == 0:
            return x_BD.new_zeros(())
        k_aux = x_BD.shape[-1] // 2
        W_dec_FD = self.params["W_dec"]
        if self.settings.rescale_acts_by_decoder_norm:
            W_dec_FD = W_dec_FD / W_dec_FD.norm(dim=-1, keepdim=True)
        losses = []
        for start, width, level_BD in self._exact_levels(f_BF, outer=True):
            n_dead = int(dead_F[start:width].sum())
            if n_dead:
                residual_BD = (x_BD - level_BD).detach()
                aux_BW = self._dead_topk(hidden_pre_BF[:, start:width], dead_F[start:width], min(k_aux, n_dead))
                l2 = (aux_BW @ W_dec_FD[start:width] - residual_BD).pow(2).sum(dim=-1).mean()
                losses.append(min(n_dead / k_aux, 1.0) * l2)
        return self.settings.aux_loss_coefficient * torch.stack(losses).sum()

    @staticmethod
    def _dead_topk(hidden_pre_BF: torch.Tensor, dead_F: torch.Tensor, k: int) -> torch.Tensor:
        """Each token's k largest hidden_pre among the dead latents (negative ones too), zeros elsewhere."""
        top = torch.where(dead_F[None], hidden_pre_BF, -torch.inf).topk(k, sorted=False)
        return torch.zeros_like(hidden_pre_BF).scatter_(-1, top.indices, top.values)

    @torch.no_grad()
    def _hidden_pre(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SAELens' hidden_pre [B, F], ((x - b_dec) @ W_enc + b_enc) * |W_dec row| with rescaled acts, without
        autograd, and 1 / |W_dec row| [F] (None without rescaling)."""
        P = self.params
        with self._autocast():
            hidden_BF = ((x_BD - P["b_dec"]) @ P["W_enc"]).float()
        hidden_BF += P["b_enc"]
        if not self.settings.rescale_acts_by_decoder_norm:
            return hidden_BF, None
        norm_F = P["W_dec"].norm(dim=-1)
        return hidden_BF.mul_(norm_F), 1 / norm_F

    def _encode(self, x_BD: torch.Tensor, kept: Kept, vals_N: torch.Tensor, inv_norm_F: torch.Tensor | None
                ) -> torch.Tensor:
        """The kept entries' codes in units of unit decoder rows [N] (hidden_pre / |W_dec row| with rescaled
        acts, else hidden_pre), with their gradients to W_enc, b_enc and b_dec."""
        if inv_norm_F is not None:
            vals_N = vals_N * inv_norm_F.index_select(0, kept.cols)
        P = self.params
        return encode_kept_with(vals_N, x_BD, P["b_dec"], P["W_enc"], P["b_enc"], kept)

    def _sparse_levels(self, latents_N: torch.Tensor, kept: Kept) -> list[torch.Tensor]:
        """The reconstructions [B, D]: x_hat alone, or for Matryoshka each level's in turn (b_dec plus the
        latents below its width), the last x_hat."""
        W_dec_FD, b_dec_D = self.params["W_dec"], self.params["b_dec"]
        if self.widths is None:
            return [decode_kept(latents_N, W_dec_FD, kept) + b_dec_D]
        B, D = kept.shape[0], W_dec_FD.shape[1]
        parts_BGD = decode_kept(latents_N, W_dec_FD, kept.by_group([0, *self.widths])).view(B, len(self.widths), D)
        return list(prefix_sums(b_dec_D, parts_BGD))

    def _sparse_aux_loss(self, x_BD, x_hat_BD, hidden_BF, inv_norm_F, dead_F) -> torch.Tensor:
        """coefficient * min(n_dead / k_aux, 1) * ||residual - top-k_aux dead latents' reconstruction||^2."""
        dead_M = torch.nonzero(dead_F).squeeze(1)
        if dead_M.numel() == 0:
            return x_hat_BD.new_zeros(())
        k_aux = x_BD.shape[-1] // 2
        l2 = self._dead_l2(x_BD, (x_BD - x_hat_BD).detach(), hidden_BF, inv_norm_F, dead_M, min(k_aux, dead_M.numel()),
                           last=True)
        return self.settings.aux_loss_coefficient * min(dead_M.numel() / k_aux, 1.0) * l2

    def _sparse_matryoshka_aux_loss(self, x_BD, levels, hidden_BF, inv_norm_F, dead_F) -> torch.Tensor:
        """Matryoshka's own aux loss: per level, its dead latents reconstruct that level's residual; summed."""
        if not bool(dead_F.any()):
            return x_BD.new_zeros(())
        k_aux = x_BD.shape[-1] // 2
        losses = []
        for start, width, level_BD in zip([0, *self.widths[:-1]], self.widths, levels, strict=True):
            dead_M = torch.nonzero(dead_F[start:width]).squeeze(1) + start
            if dead_M.numel():
                l2 = self._dead_l2(x_BD, (x_BD - level_BD).detach(), hidden_BF, inv_norm_F, dead_M,
                                   min(k_aux, dead_M.numel()), last=width == self.widths[-1])
                losses.append(min(dead_M.numel() / k_aux, 1.0) * l2)
        return self.settings.aux_loss_coefficient * torch.stack(losses).sum()

    def _dead_l2(self, x_BD, residual_BD, hidden_BF, inv_norm_F, dead_M, k: int, last: bool = False) -> torch.Tensor:
        """||residual - the reconstruction from each token's k largest hidden_pre among dead_M||^2, mean over
        the batch: the dead latents' codes, negative ones too, decoded without b_dec. `last`: hidden_BF is not
        read again (the selection may overwrite it)."""
        picks, vals_N = dead_picks(hidden_BF, dead_M, k, overwrite=last)
        recon_BD = decode_kept(self._encode(x_BD, picks, vals_N, inv_norm_F), self.params["W_dec"], picks)
        return (recon_BD - residual_BD).pow(2).sum(dim=-1).mean()

    @torch.no_grad()
    def _update_threshold(self, smallest: torch.Tensor) -> None:
        """topk_threshold := (1 - lr) * topk_threshold + lr * (the smallest positive kept value), in float64; left
        as it is when nothing in the global batch fired (smallest: inf)."""
        if torch.isfinite(smallest):
            with torch.autocast(self.topk_threshold.device.type, enabled=False):
                lr = self.settings.topk_threshold_lr
                self.topk_threshold = (1 - lr) * self.topk_threshold + lr * smallest.to(torch.float64)

    def dead_mask(self) -> torch.Tensor:
        """[F] bool: latents that have not fired for more than dead_feature_window steps."""
        return self.n_forward_passes_since_fired > self.settings.dead_feature_window

    def nonfinite_step(self) -> int | None:
        """The first step (1-based) at which the loss of any process was NaN or Inf, or None. A collective
        under data parallelism: every process must call it at the same step."""
        at_W = self.comm.cat(self._nonfinite_at.reshape(1))
        bad_W = at_W[at_W > 0]
        return int(bad_W.min()) if bad_W.numel() else None

    @torch.no_grad()
    def fold_for_inference(self, scale: float = 1.0) -> None:
        """Turn the training SAE into the inference SAE that SAELens saves (what its fit() does at the end, then
        save_inference_model): `fold_scaling(scale)`, `fold_decoder_norms()`, and threshold = topk_threshold,
        written into the module `sae`, which then works on raw activations, per token at its threshold."""
        self.fold_scaling(scale)
        self.fold_decoder_norms()
        sae, P = self.sae, self.params
        sae.W_enc_DF.copy_(P["W_enc"])
        sae.W_dec_FD.copy_(P["W_dec"])
        sae.b_enc_F.copy_(P["b_enc"])
        sae.b_dec.copy_(P["b_dec"])
        sae.threshold.fill_(self.topk_threshold.item())

    @torch.no_grad()
    def fold_scaling(self, scale: float) -> None:
        """For training inputs x * scale (expected_average_only_in; 1.0: none): W_enc *= scale, W_dec /= scale,
        b_dec /= scale and, with rescaled acts, topk_threshold /= scale (it is in units of the decoder norms,
        SAELens #763): the same latents from raw x, the reconstruction in raw units."""
        if scale == 1.0:
            return
        P = self.params
        P["W_enc"].mul_(scale)
        P["W_dec"].div_(scale)
        P["b_dec"].div_(scale)
        if self.settings.rescale_acts_by_decoder_norm:
            self.topk_threshold /= scale

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """With rescaled acts, each latent's decoder norm n (clamped at 1e-8) into the encoder: b_enc and W_enc's
        column times n, W_dec's row divided by n, so that plain relu((x - b_dec) @ W_enc + b_enc) is the
        training's rescaled pre-activation and the decoder rows have unit norm. Without, nothing changes."""
        if not self.settings.rescale_acts_by_decoder_norm:
            return
        P = self.params
        norm_F = P["W_dec"].norm(dim=-1).clamp(min=1e-8)
        P["b_enc"].mul_(norm_F)
        P["W_dec"].div_(norm_F[:, None])
        P["W_enc"].mul_(norm_F[None, :])

    def training_state(self) -> dict[str, torch.Tensor]:
        """The SAE in SAELens' training state-dict contract: W_enc [D, F], W_dec [F, D], b_enc [F], b_dec [D],
        topk_threshold [] float64."""
        return {**{name: p.detach().clone() for name, p in self.params.items()},
                "topk_threshold": self.topk_threshold.clone()}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.params["b_dec"].device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def _log(self, x_BD, x_hat_BD, n_kept: int, loss, mse, aux, lr: float) -> dict[str, float]:
        comm = self.comm
        x_hat_BD = x_hat_BD.float()
        scalars = comm.mean(torch.stack([loss.detach().float(), mse.detach().float(), aux.detach().float(),
                                         loss.new_tensor(n_kept / x_BD.shape[0]).float()]))
        # Variance explained as dictionary_learning defines it (the workbench's one definition everywhere).
        moments = comm.sum(torch.stack([x_BD.sum(0), x_BD.pow(2).sum(0), (x_BD - x_hat_BD).sum(0),
                                        (x_BD - x_hat_BD).pow(2).sum(0)]).double())
        n = x_BD.shape[0] * comm.world_size
        var_x = (moments[1] - moments[0] ** 2 / n).sum()
        var_e = (moments[3] - moments[2] ** 2 / n).sum()
        loss_v, mse_v, aux_v, l0 = scalars.tolist()
        return {"loss": loss_v, "mse": mse_v, "auxk_loss": aux_v, "l0": l0,
                "frac_variance_explained": float(1 - var_e / var_x), "dead": self.dead,
                "threshold": float(self.topk_threshold), "lr": lr, "k": self.k}

    def state_dict(self) -> dict:
        return {"params": self.training_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step,
                "n_forward_passes_since_fired": self.n_forward_passes_since_fired.clone()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][name])
        self.topk_threshold = state["params"]["topk_threshold"].to(self.topk_threshold.device, torch.float64).clone()
        # A copy: Adam updates its moments in place, and torch's load_state_dict keeps the given tensors
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.n_forward_passes_since_fired.copy_(state["n_forward_passes_since_fired"])
        self.dead = int(self.dead_mask().sum())


def _mse(x_hat_BD: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
    """||x - x_hat||^2 summed over D, mean over the batch (SAELens' mse_loss(reduction="none").sum(-1).mean())."""
    return (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean()


@torch.no_grad()
def dead_picks(hidden_BF: torch.Tensor, dead_M: torch.Tensor, k: int, overwrite: bool = False) -> tuple[Kept, torch.Tensor]:
    """Each token's k largest hidden_pre among the dead latents dead_M (sorted indices), negative ones too (SAELens'
    aux rule has no relu): (the picks, row-major, their values).

    With `overwrite` (hidden_BF is not read again) and at least half the latents dead, the picks come from
    `auxk_select`, the positive-only rule found without a top-k over every dead column: where it keeps k entries
    in every row, each row's k largest are positive and the two rules pick the same entries. Otherwise (a row
    with fewer than k positive values, or fewer dead latents), the top-k over the dead columns (auxk_select
    leaves the dead columns' values as they are)."""
    B, F = hidden_BF.shape
    if overwrite and 2 * dead_M.numel() >= F:  # with fewer dead, the top-k over their gathered columns is faster
        picks, vals_N = auxk_select(hidden_BF, dead_M, k)
        if len(picks) == B * k:
            return picks, vals_N
    sub_BM = hidden_BF if dead_M.numel() == F else hidden_BF.index_select(1, dead_M)
    top = sub_BM.topk(k, dim=1, sorted=False)
    picks_BK, order_BK = top.indices.sort(dim=1)
    rows_BK = torch.arange(B, device=hidden_BF.device)[:, None].expand_as(picks_BK)
    cols_BK = picks_BK if dead_M.numel() == F else dead_M[picks_BK]
    return Kept(rows_BK.reshape(-1), cols_BK.reshape(-1), (B, F)), top.values.gather(1, order_BK).reshape(-1)
