"""Train the tiny embedded language models on the shipped corpus: `python -m workbench.embedded_train`.

Writes workbench/assets/<name>.safetensors (fp32), which `embedded.build` loads into the model. The
weights are committed, so that every machine builds identical models (tests compare exact token sets)
and no fresh checkout pays for training; this script is how they were made, and
tests/test_embedded.py checks that it still makes them.

What it does, for tiny-qwen3 and tiny-gemma3 alike:
- data: the first TRAIN_ROWS packed rows of CONTEXT tokens of the corpus, exactly the rows the demo
  recipe collects; the text after them (where `workbench eval` finds its held-out rows) is never
  trained on, and the loss on HELDOUT_ROWS of it is printed at the end;
- start: `embedded.new_model`, the seeded init with the sinks planted; the sinks' massive channel and
  the final norm's zero on it stay fixed (restored after every step), so the model learns around them;
- loss: next-token cross-entropy, except the prediction made at a sink: its residual is almost all the
  massive channel, and a model trained to predict from it learns to cancel the sink in its first layer;
- AdamW, lr LR with linear warmup and cosine decay, STEPS steps of BATCH_ROWS rows drawn without
  replacement from a seeded generator, one thread.

Deterministic on one machine: the same tensors every run (one thread, seeded). Exact equality across
machines cannot be promised: another CPU capability (AVX2 against AVX-512) or torch build picks other
matmul kernels that round differently, and training is chaotic: perturbing every initial weight by one
fp32 ulp moved the trained weights by up to 2% (tiny-qwen3) and 39% (tiny-gemma3) of a tensor's scale,
while the held-out loss moved by under 0.02 nats. So the weights file records the CPU capability, the
torch version and the held-out loss, and the reproduction test asserts identical tensors where those
match and the same held-out loss (within 0.1 nats) elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.config import DataConfig
from workbench.data import iter_rows
from workbench.embedded import (
    PREFIX,
    SINK_CHANNEL,
    SPECS,
    TRAINED,
    build_tokenizer,
    corpus_documents,
    new_model,
    pick_sink_tokens,
    tokenizer_digest,
    weights_path,
)

CONTEXT = 128  # recipes/demo.yaml: data.context_length
TRAIN_ROWS = 1024  # recipes/demo.yaml: data.num_tokens / data.context_length
HELDOUT_ROWS = 64  # recipes/demo.yaml: eval.num_tokens / data.context_length
STEPS = 150
BATCH_ROWS = 16
LR = 1e-2
WARMUP_STEPS = 20
FINAL_LR_FRACTION = 0.1
GRAD_CLIP = 1.0


def corpus_rows(tokenizer, num_rows: int) -> torch.Tensor:
    """The corpus's first num_rows packed rows [num_rows, CONTEXT], as collection and eval read them."""
    cfg = DataConfig(path=PREFIX + "corpus", context_length=CONTEXT, num_tokens=num_rows * CONTEXT, packing=True)
    return torch.tensor(list(iter_rows(cfg, tokenizer)))


def lm_loss(model, ids_BL: torch.Tensor, sink_ids: list[int], skip_sinks: bool) -> torch.Tensor:
    """Mean next-token cross-entropy (nats); skip_sinks leaves out the predictions made at sink tokens."""
    logits_BLV = model(input_ids=ids_BL, use_cache=False).logits
    targets_BL = ids_BL[:, 1:].clone()
    if skip_sinks:
        targets_BL[torch.isin(ids_BL[:, :-1], torch.tensor(sink_ids))] = -100
    return F.cross_entropy(logits_BLV[:, :-1].flatten(0, 1), targets_BL.flatten(), ignore_index=-100)


def _lr_factor(step: int) -> float:
    warmup = min(1.0, (step + 1) / WARMUP_STEPS)
    cosine = 0.5 * (1 + math.cos(math.pi * step / STEPS))
    return warmup * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * cosine)


def train(key: str, log=print) -> tuple[torch.nn.Module, dict]:
    """Train one embedded model; returns (model, metadata for the weights file)."""
    torch.set_num_threads(1)  # the result depends on the thread count (summation order)
    spec = SPECS[key]
    documents = corpus_documents()
    tokenizer = build_tokenizer(spec.arch, spec.vocab_size, documents)
    sink_ids = pick_sink_tokens(spec, tokenizer, documents)
    rows_RL = corpus_rows(tokenizer, TRAIN_ROWS + HELDOUT_ROWS)
    train_RL, heldout_RL = rows_RL[:TRAIN_ROWS], rows_RL[TRAIN_ROWS:]
    model = new_model(spec, tokenizer, sink_ids)
    emb_VD = model.get_input_embeddings().weight
    norm_D = model.model.norm.weight
    fixed_sinks = emb_VD[sink_ids, SINK_CHANNEL].detach().clone()
    fixed_norm = norm_D[SINK_CHANNEL].detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor)
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    start = time.perf_counter()
    for step in range(STEPS):
        if len(order) < BATCH_ROWS:
            order = torch.cat([order, torch.randperm(TRAIN_ROWS, generator=gen)])
        batch, order = order[:BATCH_ROWS], order[BATCH_ROWS:]
        loss = lm_loss(model, train_RL[batch], sink_ids, skip_sinks=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        sched.step()
        with torch.no_grad():
            emb_VD[sink_ids, SINK_CHANNEL] = fixed_sinks
            norm_D[SINK_CHANNEL] = fixed_norm
        if step % 50 == 0 or step == STEPS - 1:
            log(f"{key} step {step}: train loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    with torch.no_grad():
        heldout = lm_loss(model, heldout_RL, sink_ids, skip_sinks=False).item()
    log(f"{key}: held-out loss {heldout:.3f} nats (uniform {math.log(len(tokenizer)):.3f}), "
        f"{time.perf_counter() - start:.0f} s")
    meta = {"tokenizer_sha256": tokenizer_digest(tokenizer), "sink_token_ids": json.dumps(sink_ids),
            "made_by": "python -m workbench.embedded_train", "steps": str(STEPS), "heldout_loss": f"{heldout:.6f}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    return model, meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.embedded_train", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"any of {', '.join(TRAINED)} (default: all)")
    parser.add_argument("--out", type=Path, help="write <out>/<name>.safetensors instead of the committed assets")
    args = parser.parse_args(argv)
    unknown = set(args.models) - set(TRAINED)
    if unknown:
        parser.error(f"unknown model {', '.join(sorted(unknown))}: choose from {', '.join(TRAINED)}")
    from safetensors.torch import save_model

    for key in args.models or TRAINED:
        model, meta = train(key)
        path = args.out / weights_path(key).name if args.out else weights_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, str(path), metadata=meta)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
