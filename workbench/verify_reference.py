"""Outputs of SAEs as their reference library loads and runs them: `workbench verify`'s other side.

    python -m workbench.verify_reference {dictionary_learning|saelens} JOBS.json

Run it with `python -m`, never import it: importing dictionary_learning imports nnsight, which patches
torch globally, and SAELens is heavy, so the workbench's own process imports neither.

JOBS.json is a list of {"folder", "inputs", "outputs"}. inputs (safetensors): x [N, D] activations and
f [N, F] latents. outputs (safetensors): encode = sae.encode(x), decode = sae.decode(f), forward = sae(x),
all float32. A job that fails writes one line to `<outputs>.error` instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load(library: str, folder: str):
    if library == "dictionary_learning":
        from dictionary_learning.utils import load_dictionary

        return load_dictionary(folder, device="cpu")[0]
    from sae_lens import SAE

    return SAE.load_from_disk(folder, device="cpu")


def main() -> None:
    library, jobs_path = sys.argv[1:3]
    torch.set_grad_enabled(False)
    for job in json.loads(Path(jobs_path).read_text()):
        try:
            sae = load(library, job["folder"])
            inputs = load_file(job["inputs"])
            out = {"encode": sae.encode(inputs["x"]), "decode": sae.decode(inputs["f"]), "forward": sae(inputs["x"])}
            save_file({k: v.float().contiguous() for k, v in out.items()}, job["outputs"])
        except Exception as err:  # reported per SAE by the caller
            message = (str(err).splitlines() or [""])[0][:300]
            Path(job["outputs"] + ".error").write_text(f"{type(err).__name__}: {message}")


if __name__ == "__main__":
    main()
