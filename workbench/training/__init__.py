"""Training SAEs on the activation cache (`workbench train`), in two modules:

    step.py   the Trainer: one update step of one SAE and its loss (reconstruction, Matryoshka prefix
              losses, aux-k), Adam and the schedules (auto_lr, lr_factor, annealed_k), the b_dec
              initialisation (geometric_median): change the training loss here
    loop.py   train(): a layer's plan (steps, schedule points, held-out share, fingerprint), the data
              lanes, normalisation, checkpoints and resume, the held-out evaluation and the SAE folders
              (ae.pt, config.json, eval_results.json, metrics.jsonl, training_curves.png)
"""

from workbench.training.loop import is_trained, layer_dir, read_metrics, train
from workbench.training.step import Trainer, auto_lr

__all__ = ["Trainer", "auto_lr", "is_trained", "layer_dir", "read_metrics", "train"]
