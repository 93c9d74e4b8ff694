"""Run sae-lens 6.54.12's own training, in its own process, as the parity tests' reference.

    python tests/reference/saelens_ref.py init  IN.pt OUT.pt    the initial training state, per spec
    python tests/reference/saelens_ref.py train IN.pt OUT.pt    SAETrainer.fit() over the batches, per spec

IN.pt holds a list of specs (the tests write them); OUT.pt a list of results, one per spec. A spec:
arch (batchtopk | matryoshka), d_in, d_sae, k, widths (Matryoshka), sae (the training SAE config's fields),
trainer (SAETrainerConfig's fields), seed; for train also state (the initial W_enc, W_dec, b_enc, b_dec,
topk_threshold), norm_batches [N, B, D] (read by the scaling estimate, when normalising) and batches
[S, B, D], and folder (where save_inference_model writes the finished SAE).
"""

from __future__ import annotations

import sys

import torch
from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer


def make_sae(spec: dict):
    common = dict(d_in=spec["d_in"], d_sae=spec["d_sae"], k=spec["k"], **spec.get("sae", {}))
    torch.manual_seed(spec.get("seed", 0))
    if spec["arch"] == "matryoshka":
        return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            matryoshka_widths=list(spec["widths"]), **common))
    return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))


def init(specs: list[dict], out: str) -> None:
    torch.save([{k: v.clone() for k, v in make_sae(spec).state_dict().items()} for spec in specs], out)


def train(specs: list[dict], out: str) -> None:
    results = []
    for spec in specs:
        sae = make_sae(spec)
        sae.load_state_dict(spec["state"])
        steps, B = spec["batches"].shape[:2]
        trainer_cfg = dict(spec.get("trainer", {}))
        trainer_cfg.setdefault("lr_end", trainer_cfg.get("lr", 3e-4) / 10)  # what the runner config's post-init sets
        cfg = SAETrainerConfig(total_training_samples=steps * B, train_batch_size_samples=B, **trainer_cfg)
        data = iter([*spec.get("norm_batches", []), *spec["batches"]])
        trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=data)
        record = {"lr": [], "loss": [], "dead": [], "threshold": []}
        scale = {}  # the estimated factor: fit() sets it back to None once it is folded
        train_step = trainer._train_step

        def recorded(sae, sae_in, train_step=train_step, trainer=trainer, record=record, scale=scale):
            scale.setdefault("factor", trainer.activation_scaler.scaling_factor)
            record["lr"].append(trainer.optimizer.param_groups[0]["lr"])
            output = train_step(sae=sae, sae_in=sae_in)
            record["loss"].append(output.loss.item())
            record["dead"].append(int(trainer.dead_neurons.sum()))
            record["threshold"].append(sae.topk_threshold.item())
            return output

        trainer._train_step = recorded
        trainer.fit()  # the activation scaling is folded into the weights at its end
        sae.save_inference_model(spec["folder"])
        results.append({"state": {k: v.clone() for k, v in sae.state_dict().items()},
                        "scaling_factor": scale["factor"],
                        "n_forward_passes_since_fired": trainer.n_forward_passes_since_fired.clone(),
                        **{key: torch.tensor(values, dtype=torch.float64) for key, values in record.items()}})
    torch.save(results, out)


if __name__ == "__main__":
    command, src, dst = sys.argv[1:4]
    {"init": init, "train": train}[command](torch.load(src, weights_only=False), dst)
