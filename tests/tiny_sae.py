"""A BatchTopK SAE trained on the trained tiny model's layer-2 output, cheaply, for the attach and attribution
tests: 300 Adam steps on kept tokens only (no sinks, no first tokens: what the trainer sees), its JumpReLU
threshold at the value where the per-token L0 on those tokens is k, saved as a dictionary_learning folder by
the workbench's own format code with the filter it was trained under recorded."""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.config import load_recipe
from workbench.data import iter_batches, iter_rows
from workbench.formats import dictionary_learning as dl
from workbench.model import capture_resid_post, load_model, load_tokenizer
from workbench.sae import BatchTopKSAE
from workbench.sink import first_token_mask, keep_mask, sink_filter

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.yaml"
LAYER, D, F, K = 2, 64, 256, 8
MODEL = "embedded:tiny-qwen3"


def tiny_lm(num_tokens: int = 8192):
    """(recipe, model, tokenizer) of the demo recipe: the trained tiny Qwen3 model, float32, on CPU."""
    recipe = load_recipe(DEMO, [f"data.num_tokens={num_tokens}"])
    return recipe, load_model(recipe.model), load_tokenizer(recipe.model)


def kept_activations(recipe, model, tokenizer, layer: int = LAYER) -> torch.Tensor:
    """Layer `layer`'s output at the tokens collection keeps (sink filter 10x, first token dropped): [N, D]."""
    kept = []
    with capture_resid_post(model, [layer]) as run:
        for b in iter_batches(iter_rows(recipe.data, tokenizer), 16, tokenizer.pad_token_id):
            h_BLD = run(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL)[layer]
            valid_BL = b.attention_mask_BL.bool()
            flt = sink_filter(h_BLD, 10, valid_BL)
            first_BL = first_token_mask(b.input_ids_BL, b.attention_mask_BL, tokenizer.bos_token_id)
            kept.append(h_BLD[keep_mask(valid_BL, flt.sink_BL, first_BL)])
    return torch.cat(kept)


def fit_sae(X_ND: torch.Tensor, steps: int = 300, seed: int = 0) -> BatchTopKSAE:
    torch.manual_seed(seed)
    sae = BatchTopKSAE(D, F, K)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(steps):
        x_BD = X_ND[torch.randint(0, len(X_ND), (512,))]
        loss = (sae.decode(sae.encode(x_BD, use_threshold=False)) - x_BD).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        sae.threshold.fill_(float(torch.quantile(sae.pre_acts(X_ND).flatten(), 1 - K / F)))
    return sae.requires_grad_(False).eval()


def save_sae(sae: BatchTopKSAE, folder: Path, layer: int = LAYER, sink_multiple: float | None = 10.0) -> Path:
    """The SAE as a dictionary_learning folder (ae.pt, config.json with trainer, buffer and workbench
    sections, as training writes them)."""
    trainer = dl.trainer_section(sae, lr=1e-2, steps=300, auxk_alpha=0.0, warmup_steps=0, decay_start=None,
                                 threshold_beta=0.999, threshold_start_step=1, seed=0, device="cpu", layer=layer,
                                 lm_name=MODEL, group_fractions=None, group_weights=None)
    config = {"trainer": trainer, "buffer": dl.buffer_section(D, 128, 1, 16, 512, "cpu"),
              "workbench": {"model": MODEL, "layer": layer, "sink_multiple": sink_multiple, "sink_median": "real",
                            "drop_first_token": True}}
    dl.save_folder(sae, folder, config)
    return folder
