"""Run dictionary_learning 0.1.0 itself, in its own process (importing it patches torch globally).

    python tests/reference/dl_ref.py train IN.pt OUT.pt    trainer.update over batches, for each spec
    python tests/reference/dl_ref.py write IN.pt FOLDER    a few updates, then ae.pt + config.json as trainSAE
    python tests/reference/dl_ref.py load  IN.pt OUT.pt    load_dictionary(folder): encode/decode, evaluate

IN.pt holds what the tests wrote (a list of specs for train and load, one spec for write); OUT.pt the
results (a list, one per spec).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from dictionary_learning.evaluation import evaluate
from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
from dictionary_learning.utils import load_dictionary


def make_trainer(spec: dict):
    common = dict(steps=spec["steps"], activation_dim=spec["activation_dim"], dict_size=spec["dict_size"],
                  k=spec["k"], layer=spec.get("layer", 0), lm_name=spec.get("lm_name", "test"), lr=spec.get("lr"),
                  warmup_steps=spec["warmup_steps"], decay_start=spec.get("decay_start"),
                  threshold_start_step=spec["threshold_start_step"], seed=spec.get("seed", 0), device="cpu")
    if spec["arch"] == "matryoshka":
        trainer = MatryoshkaBatchTopKTrainer(group_fractions=spec["group_fractions"],
                                             group_weights=spec.get("group_weights"), **common)
    else:
        trainer = BatchTopKTrainer(**common)
    trainer.dead_feature_threshold = spec.get("dead_feature_threshold", 10_000_000)
    if "state" in spec:
        trainer.ae.load_state_dict(spec["state"])
    return trainer


def train(specs: list[dict], out: str) -> None:
    """Each spec: trainer arguments, the initial state dict and the batches [S, B, D]. Each result: the
    final state, the dead counters, the losses and the trainer's and SAE's class names."""
    results = []
    for spec in specs:
        trainer = make_trainer(spec)
        losses = [trainer.update(step, x_BD.clone()) for step, x_BD in enumerate(spec["batches"])]
        results.append({"state": {k: v.clone() for k, v in trainer.ae.state_dict().items()},
                        "num_tokens_since_fired": trainer.num_tokens_since_fired.clone(),
                        "losses": torch.tensor(losses, dtype=torch.float64),
                        "trainer_class": type(trainer).__name__, "dict_class": type(trainer.ae).__name__})
    torch.save(results, out)


def write(spec: dict, folder: str) -> None:
    """What trainSAE leaves behind: config.json {trainer, buffer} (indent 4) and ae.pt, biases folded."""
    trainer = make_trainer(spec)
    for step, x_BD in enumerate(spec["batches"]):
        trainer.update(step, x_BD.clone() / spec["norm_factor"])
    os.makedirs(folder, exist_ok=True)
    config = {"trainer": trainer.config, "buffer": spec["buffer"]}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=4)
    trainer.ae.scale_biases(spec["norm_factor"])
    torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, os.path.join(folder, "ae.pt"))


def load(specs: list[dict], out: str) -> None:
    """Each spec: a folder and activations x [N, D]; evaluate() runs on x in batches of eval_batch."""
    results = []
    for spec in specs:
        ae, config = load_dictionary(spec["folder"], device="cpu")
        x_BD = spec["x"]
        with torch.no_grad():
            f_thr = ae.encode(x_BD)
            f_topk = ae.encode(x_BD, use_threshold=False)
            x_hat = ae(x_BD)
        batches = list(x_BD.split(spec["eval_batch"]))
        results.append({"f_threshold": f_thr, "f_topk": f_topk, "x_hat": x_hat, "k": int(ae.k),
                        "threshold": float(ae.threshold), "dict_class": type(ae).__name__,
                        "eval": dict(evaluate(ae, iter(batches), device="cpu", n_batches=len(batches))),
                        "config": config})
    torch.save(results, out)


if __name__ == "__main__":
    command, src, dst = sys.argv[1:4]
    spec = torch.load(src, weights_only=False)
    {"train": train, "write": write, "load": load}[command](spec, dst)
