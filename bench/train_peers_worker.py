"""One side of bench/train_peers_bench.py, in its own process: reads one JSON request a line on stdin,
times that many training steps of its library on the regime's spec file, answers one JSON line.

    python bench/train_peers_worker.py SIDE THREADS     SIDE: workbench | floor | dictionary_learning |
                                                          saelens | sparsify | workbench_saelens

A request: {"spec": path, "warmup": n, "steps": n}. The spec (torch.save, written by the driver) holds
the sizes, the initial weights in the workbench's state-dict layout (dictionary_learning's), the batches
[n, B, D] and the dead-latent regime:
    none  no latent dead;
    10    every 10th latent dead: its encoder bias lowered by the batch top-k cut (so it almost never
          fires) and its "tokens since fired" counter set past the threshold before every step;
    all   every latent dead at every step (the aux-k worst case): dictionary_learning's and the
          workbench's threshold 0 (a counter >= 0), SAELens' and sparsify's counters set past their
          thresholds before every step (their dead masks are taken before the forward pass).
The answer: {"s": wall-clock seconds for the timed steps, "cpu_s": the process's CPU seconds for them,
"dead": dead latents at the last step}.

"floor" times the encoder product alone, (x - b_dec) @ W_enc with W_enc [D, F] contiguous, into one
preallocated [B, F] output, on the same batches: no exact method of any of these steps can beat it.

Only torch and the side's own library are imported (sparsify runs in its own virtualenv; importing
dictionary_learning patches torch, so each side has a process of its own).
"""

from __future__ import annotations

import json
import sys
import time

import torch

BIG = 10**12  # a "since fired" count past every library's dead threshold


def group_sizes(F: int, fractions: list[float]) -> list[int]:
    sizes = [int(f * F) for f in fractions[:-1]]
    return [*sizes, F - sum(sizes)]


def workbench(spec: dict):
    sys.path.insert(0, spec["repo"])
    from workbench.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE
    from workbench.training import Trainer

    D, F, k = spec["D"], spec["F"], spec["k"]
    sae = (MatryoshkaBatchTopKSAE(D, F, k, group_sizes(F, spec["fractions"])) if spec["grouped"]
           else BatchTopKSAE(D, F, k))
    sae.load_state_dict(spec["state"])
    trainer = Trainer(sae, 10**6, warmup_steps=2, dead_feature_threshold=0 if spec["dead"] == "all" else 10_000_000)
    dead_idx = spec["dead_idx"]

    def step(x_BD):
        if spec["dead"] == "10":
            trainer.num_tokens_since_fired[dead_idx] = BIG
        trainer.update(x_BD)
        return trainer.dead
    return step


def mark_dead_steps(since_fired_F: torch.Tensor, spec: dict) -> None:
    """SAELens' counters (steps since a latent fired) past its dead window for the regime's dead latents, before
    a step (its dead mask is taken before the forward pass)."""
    if spec["dead"] == "10":
        since_fired_F[spec["dead_idx"]] = BIG
    elif spec["dead"] == "all":
        since_fired_F[:] = BIG


def floor(spec: dict):
    state = spec["state"]
    W_enc_DF = (state["W_enc"] if spec["grouped"] else state["encoder.weight"].T).contiguous()
    b_dec_D = state["b_dec"]
    out_BF = torch.empty(spec["batches"].shape[1], spec["F"])

    def step(x_BD):
        torch.mm(x_BD - b_dec_D, W_enc_DF, out=out_BF)
        return 0
    return step


def dictionary_learning(spec: dict):
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    common = dict(steps=10**6, activation_dim=spec["D"], dict_size=spec["F"], k=spec["k"], layer=0, lm_name="bench",
                  warmup_steps=2, device="cpu")
    if spec["grouped"]:
        trainer = MatryoshkaBatchTopKTrainer(**common, group_fractions=spec["fractions"])
    else:
        trainer = BatchTopKTrainer(**common)
    trainer.ae.load_state_dict(spec["state"])
    if spec["dead"] == "all":
        trainer.dead_feature_threshold = 0
    dead_idx = spec["dead_idx"]
    counter = [0]

    def step(x_BD):
        if spec["dead"] == "10":
            trainer.num_tokens_since_fired[dead_idx] = BIG
        trainer.update(counter[0], x_BD)
        counter[0] += 1
        return int((trainer.num_tokens_since_fired >= trainer.dead_feature_threshold).sum())
    return step


def saelens(spec: dict):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.training.sae_trainer import SAETrainer

    D, F, k, state = spec["D"], spec["F"], spec["k"], spec["state"]
    common = dict(d_in=D, d_sae=F, k=k, aux_loss_coefficient=1 / 32, dtype="float32", device="cpu")
    if spec["grouped"]:
        widths = torch.tensor(group_sizes(F, spec["fractions"])).cumsum(0).tolist()
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**common, matryoshka_widths=widths))
        weights = {"W_enc": state["W_enc"], "b_enc": state["b_enc"], "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
        weights = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"], "W_dec": state["decoder.weight"].T,
                   "b_dec": state["b_dec"]}
    with torch.no_grad():
        for name, value in weights.items():
            getattr(sae, name).copy_(value)
    B = spec["batches"].shape[1]
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=B, lr=2e-4, lr_end=2e-4,
                                          dead_feature_window=1000), sae, data_provider=iter(()))

    def step(x_BD):
        mark_dead_steps(trainer.n_forward_passes_since_fired, spec)
        dead = int(trainer.dead_neurons.sum())
        trainer._train_step(sae, x_BD)
        trainer.n_training_steps += 1
        return dead
    return step


def workbench_saelens(spec: dict):
    """The workbench's SAELens-algorithm step (SAELensTrainer, train.saelens.exact false) at the saelens side's
    settings, from the same weights in SAELens' layout, with the same dead-latent regime."""
    sys.path.insert(0, spec["repo"])
    from workbench.config import SAELensTrainConfig
    from workbench.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE
    from workbench.training.saelens_step import SAELensTrainer

    D, F, k = spec["D"], spec["F"], spec["k"]
    sae = (MatryoshkaBatchTopKSAE(D, F, k, group_sizes(F, spec["fractions"])) if spec["grouped"]
           else BatchTopKSAE(D, F, k))
    sae.load_state_dict(spec["state"])
    settings = SAELensTrainConfig(lr=2e-4, lr_end=2e-4, aux_loss_coefficient=1 / 32, dead_feature_window=1000,
                                  exact=False)
    trainer = SAELensTrainer(sae, 10**6, settings)

    def step(x_BD):
        mark_dead_steps(trainer.n_forward_passes_since_fired, spec)
        dead = int(trainer.dead_mask().sum())
        trainer.update(x_BD)
        return dead
    return step


def sparsify(spec: dict):
    """sparsify's Trainer.fit step for one TopK SparseCoder (per-token top-k), without its data loading:
    unit-norm decoder, the dead mask from the counters, fvu + auxk_alpha * auxk, the gradient projection,
    Adam, the counters."""
    from sparsify import SparseCoder, SparseCoderConfig

    D, F, k, state = spec["D"], spec["F"], spec["k"], spec["state"]
    sae = SparseCoder(D, SparseCoderConfig(num_latents=F, k=k), device="cpu", dtype=torch.float32)
    with torch.no_grad():  # sparsify's layout: encoder.weight [F, D], W_dec [F, D]
        sae.encoder.weight.copy_(state["encoder.weight"])
        sae.encoder.bias.copy_(state["encoder.bias"])
        sae.W_dec.copy_(state["decoder.weight"].T)
        sae.b_dec.copy_(state["b_dec"])
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4)
    counts = torch.zeros(F, dtype=torch.long)
    threshold, dead_idx = 10_000_000, spec["dead_idx"]

    def step(x_BD):
        sae.set_decoder_norm_to_unit_norm()
        if spec["dead"] == "10":
            counts[dead_idx] = BIG
        elif spec["dead"] == "all":
            counts[:] = BIG
        dead_mask = counts > threshold
        out = sae(x_BD, dead_mask=dead_mask)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            fired = torch.zeros(F, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            counts.add_(x_BD.shape[0])
            counts[fired] = 0
        return int(dead_mask.sum())
    return step


SIDES = {"workbench": workbench, "floor": floor, "dictionary_learning": dictionary_learning, "saelens": saelens,
         "sparsify": sparsify, "workbench_saelens": workbench_saelens}


def main() -> None:
    side, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)
    build = SIDES[side]
    print(json.dumps({"ready": side}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        spec = torch.load(request["spec"], weights_only=False)
        torch.manual_seed(0)
        step = build(spec)
        batches = spec["batches"]
        n_warm, n = request["warmup"], request["steps"]
        for i in range(n_warm):
            step(batches[i % len(batches)].clone())
        xs = [batches[(n_warm + i) % len(batches)].clone() for i in range(n)]
        start, start_cpu = time.perf_counter(), time.process_time()
        for x_BD in xs:
            dead = step(x_BD)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        print(json.dumps({"s": seconds, "cpu_s": cpu_seconds, "dead": dead}), flush=True)


if __name__ == "__main__":
    main()
