"""The GPU check: collection and training on a CUDA device at the published Qwen3-1.7B shapes, with
throughput figures and device-vs-CPU correctness, in one command (bench/gpu_check.sh).

    .venv/bin/python bench/gpu_check.py

On CUDA (bf16): a random-weight Qwen3 model of the real Qwen3-1.7B architecture (no download), 3 layers
(25/50/75% depth) collected with the sink filter through `collect()`, against a bare forward over the
same rows; the four Qwen3 trainers' shapes (d_model 2048; widths 16384/65536; k 80/160; batch 2048)
trained from that cache's 50% layer with bf16 autocast, all four from one `train()` pass; each SAE's
Trainer.update alone, dictionary_learning's BatchTopKTrainer.update (its own process: importing it
patches torch) and the dense encoder product (the floor) at the same shapes; correctness: a training
step on the device against the same step on CPU, and a cache collected on the device against one
collected on CPU (fp32: bit-identical; bf16: within rounding), with identical kept-token sets.
Without CUDA every step runs, reduced (tiny shapes, 20 steps, fp32), so the script is known to work;
the device-vs-CPU comparisons become CPU-vs-CPU ones (1 vs 2 threads; two collections).

Prints one table and writes bench/results/gpu_check.json.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workbench import data as data_mod  # noqa: E402
from workbench.cache import ActivationCache  # noqa: E402
from workbench.collect import collect  # noqa: E402
from workbench.config import ModelConfig, SAEConfig, load_recipe  # noqa: E402
from workbench.embedded import SPECS, corpus_documents, pick_sink_tokens  # noqa: E402
from workbench.model import load_tokenizer  # noqa: E402
from workbench.sae.registry import BATCHTOPK  # noqa: E402
from workbench.training import Trainer, layer_dir, read_metrics, train  # noqa: E402
from workbench.training.loop import METRICS, global_batches, plan_layer  # noqa: E402

# https://huggingface.co/Qwen/Qwen3-1.7B/blob/main/config.json (the Qwen3Config arguments of it)
QWEN3_1_7B = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 28,
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# Reduced on CPU: the same architecture (GQA, qk-norm, tied embeddings), tiny; the vocabulary is the
# embedded tokenizer's (on CUDA the real 151936 rows stay: the tokenizer's ids are a subset).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1024}
SIZES = {  # collection rows x context, training batch and steps, the four trainers (width, k)
    True: {"model": {}, "context": 2048, "rows": 336, "batch_rows": 16, "B": 2048, "steps": 300,
           "saes": [(16384, 80), (16384, 160), (65536, 80), (65536, 160)], "timed_steps": 50, "ref_steps": 20,
           "check_model": {"num_hidden_layers": 4}, "check_rows": 8, "check_context": 256, "eval_tokens": 16384},
    False: {"model": TINY, "context": 128, "rows": 96, "batch_rows": 8, "B": 256, "steps": 20,
            "saes": [(256, 8), (256, 16), (1024, 8), (1024, 16)], "timed_steps": 10, "ref_steps": 10,
            "check_model": TINY, "check_rows": 16, "check_context": 64, "eval_tokens": 1024},
}[CUDA]
AUTOCAST = "bfloat16" if CUDA else None
WARMUP = 3
SINK_SCALE = 100.0  # planted sink embeddings at 100x the median norm: the 10x filter has tokens to drop
# Relative Frobenius differences of a parameter's change over the checked steps. 1 vs 2 CPU threads:
# only the summation order differs. CUDA fp32 (TF32 off, torch's default for matmul): kernels differ
# too. CUDA bf16 autocast against CPU fp32: bf16 keeps 8 significant bits (2^-8 = 0.4% an operation).
STEP_TOL = {"cpu-threads": 1e-4, "cuda-fp32": 1e-3, "cuda-bf16": 5e-2}
BF16_CACHE_TOL = 2e-2  # relative Frobenius difference of a bf16 cache collected on two devices

REFERENCE = r"""
import contextlib, sys, time, torch
from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
spec = torch.load(sys.argv[1], weights_only=True)
dev = spec["device"]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
batches = spec["batches"].to(dev)
for width, k in spec["saes"]:
    torch.manual_seed(0)
    trainer = BatchTopKTrainer(steps=10_000, activation_dim=batches.shape[-1], dict_size=width, k=k, layer=0,
                               lm_name="gpu_check", warmup_steps=2, device=dev)
    autocast = (torch.autocast(device_type=dev, dtype=torch.bfloat16) if spec["autocast"] else contextlib.nullcontext())
    with autocast:
        for step in range(len(batches)):
            if step == spec["warmup"]:
                sync(); start = time.perf_counter()
            trainer.update(step, batches[step])
        sync()
    print(width, k, time.perf_counter() - start)
"""


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def build_model(overrides: dict, dtype: torch.dtype, tokenizer, sink_ids: list[int]):
    """The seeded random-weight Qwen3 model, built on CPU in fp32 (so that every device gets the same
    weights), with planted sinks, cast to `dtype` and moved to DEVICE by the caller."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    # The special ids are the embedded tokenizer's: its ids are the ones the rows hold.
    config = Qwen3Config(**{**QWEN3_1_7B, **overrides, "bos_token_id": tokenizer.bos_token_id,
                            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        emb_VD = model.get_input_embeddings().weight
        emb_VD[sink_ids, 0] = emb_VD.norm(dim=1).median() * SINK_SCALE
    model.requires_grad_(False)
    return model.to(dtype).eval()


def collect_recipe(out: Path, dtype: str, context: int, rows: int, device: str | None):
    return load_recipe(None, ["model.name=embedded:tiny-qwen3", f"model.dtype={dtype}", f"data.context_length={context}",
                              f"data.num_tokens={context * rows}", f"collect.batch_size={SIZES['batch_rows']}",
                              "collect.layers=[0.25,0.5,0.75]", "collect.sink_multiple=10", "collect.sink_median=all",
                              "collect.shard_batches=4", f"collect.out={out}",
                              f"collect.device={device}" if device else "collect.device=null"])


def quiet_collect(recipe, model, tokenizer):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return collect(recipe, model=model, tokenizer=tokenizer)


def bare_forward(model, recipe, tokenizer) -> float:
    """Seconds of model(**batch) over the rows collection reads (synchronised: the last kernel counts)."""
    batches = list(data_mod.iter_batches(data_mod.iter_rows(recipe.data, tokenizer), recipe.collect.batch_size,
                                         tokenizer.pad_token_id))
    device = next(model.parameters()).device
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        for b in batches:
            model(input_ids=b.input_ids_BL.to(device), attention_mask=b.attention_mask_BL.to(device), use_cache=False)
        sync()
    return time.perf_counter() - start


def step_collection(tmp: Path, tokenizer, sink_ids: list[int], results: dict) -> tuple[Path, int]:
    dtype = "bfloat16" if CUDA else "float32"
    model = build_model(SIZES["model"], getattr(torch, dtype), tokenizer, sink_ids).to(DEVICE)
    recipe = collect_recipe(tmp / "cache", dtype, SIZES["context"], SIZES["rows"], None if CUDA else "cpu")
    bare_forward(model, collect_recipe(tmp / "w", dtype, SIZES["context"], SIZES["batch_rows"], None), tokenizer)  # warm-up
    bare = bare_forward(model, recipe, tokenizer)
    start = time.perf_counter()
    summary = quiet_collect(recipe, model, tokenizer)
    seconds = time.perf_counter() - start
    with ActivationCache(recipe.collect.out) as cache:
        layers = cache.layers
        kept = {layer: cache.num_tokens(layer) for layer in layers}
    results["collection"] = {"dtype": dtype, "layers": layers, "model_layers": model.config.num_hidden_layers,
                             "d_model": model.config.hidden_size, "tokens": summary.tokens, "kept_tokens": kept,
                             "bare_forward_tok_s": summary.tokens / bare, "collect_tok_s": summary.tokens / seconds,
                             "ratio_vs_bare": bare / seconds}
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return Path(recipe.collect.out), layers[len(layers) // 2]


def train_recipe(cache: Path, out: Path, layer: int):
    B, steps = SIZES["B"], SIZES["steps"]
    recipe = load_recipe(None, [f"collect.out={cache}", f"train.layers=[{layer}]", f"train.batch_size={B}",
                                f"train.num_tokens={B * steps}", "train.warmup_steps=10", "train.decay_start=null",
                                f"train.threshold_start_step={steps // 2}", f"train.autocast_dtype={AUTOCAST or 'null'}",
                                "train.checkpoint_every=1000000", f"train.eval_tokens={SIZES['eval_tokens']}",
                                f"train.out={out}"])
    recipe.train.saes = [SAEConfig(name=f"trainer_{i}", arch=BATCHTOPK.name, width=w, k=k)
                         for i, (w, k) in enumerate(SIZES["saes"])]
    return recipe


def time_trainer(width: int, k: int, batches: list[torch.Tensor]) -> float:
    """Seconds of Trainer.update over batches[WARMUP:] (one SAE alone, after WARMUP untimed steps)."""
    torch.manual_seed(0)
    sae = BATCHTOPK.build(batches[0].shape[1], width, k, None).to(DEVICE)
    trainer = Trainer(sae, 10_000, warmup_steps=2, autocast_dtype=getattr(torch, AUTOCAST) if AUTOCAST else None)
    for x_BD in batches[:WARMUP]:
        trainer.update(x_BD)
    sync()
    start = time.perf_counter()
    for x_BD in batches[WARMUP:]:
        trainer.update(x_BD)
    sync()
    return time.perf_counter() - start


def encoder_floor(B: int, D: int, F: int, reps: int = 20) -> float:
    """Seconds of the dense encoder product x [B, D] @ W_enc [D, F] alone, in the training dtype."""
    dtype = getattr(torch, AUTOCAST) if AUTOCAST else torch.float32
    x_BD, W_DF = torch.randn(B, D, device=DEVICE, dtype=dtype), torch.randn(D, F, device=DEVICE, dtype=dtype)
    for _ in range(3):
        x_BD @ W_DF
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        x_BD @ W_DF
    sync()
    return (time.perf_counter() - start) / reps


def time_reference(batches: list[torch.Tensor], tmp: Path) -> dict[str, float]:
    """dictionary_learning's BatchTopKTrainer.update per shape: seconds over batches[WARMUP:]."""
    spec = tmp / "reference.pt"
    torch.save({"device": DEVICE.type, "autocast": AUTOCAST is not None, "warmup": WARMUP, "saes": SIZES["saes"],
                "batches": torch.stack([b.cpu() for b in batches])}, spec)
    proc = subprocess.run([sys.executable, "-c", REFERENCE, str(spec)], capture_output=True, text=True, check=True)
    return {f"{w}/{k}": float(s) for w, k, s in (line.split() for line in proc.stdout.strip().splitlines()[-len(SIZES["saes"]):])}


def step_training(cache: Path, layer: int, tmp: Path, results: dict) -> list[torch.Tensor]:
    """The training figures; returns the first two training batches (for the step-equality check)."""
    B = SIZES["B"]
    recipe = train_recipe(cache, tmp / "saes", layer)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        folders = train(recipe)
    wall = time.perf_counter() - start
    rates = [m["tokens_per_s"] for m in read_metrics(folders[0] / METRICS)][WARMUP:]
    pass_tok_s = float(np.median(rates))
    with ActivationCache(cache) as c:
        plan = plan_layer(recipe, c, layer)
    n = WARMUP + SIZES["timed_steps"]
    batches = [x.to(DEVICE) for x, _ in itertools.islice(
        global_batches(cache, layer, list(range(recipe.train.data_lanes)), recipe.train, plan, 0, None), n)]
    per_sae = {}
    for w, k in SIZES["saes"]:
        seconds = time_trainer(w, k, batches)
        per_sae[f"{w}/{k}"] = {"workbench_tok_s": SIZES["timed_steps"] * B / seconds,
                               "encoder_floor_tok_s": B / encoder_floor(B, batches[0].shape[1], w)}
    try:
        ref = time_reference(batches[:WARMUP + SIZES["ref_steps"]], tmp)
        for key, seconds in ref.items():
            per_sae[key]["dictionary_learning_tok_s"] = SIZES["ref_steps"] * B / seconds
        reference = "ran"
    except subprocess.CalledProcessError as err:
        reference = f"failed: {err.stderr.strip().splitlines()[-1] if err.stderr.strip() else err}"
    results["training"] = {"layer": layer, "B": B, "steps": SIZES["steps"], "autocast": AUTOCAST,
                           "one_pass_all_four_tok_s": pass_tok_s, "train_wall_s": wall,
                           "folders_written": all((layer_dir(recipe.train.out, layer) / s.name / "ae.pt").is_file()
                                                  for s in recipe.train.saes),
                           "per_sae": per_sae, "reference": reference}
    return [x.cpu() for x in batches[:2]]


def run_steps(device: torch.device, autocast: str | None, batches: list[torch.Tensor], width: int, k: int):
    """(first step's loss, each parameter's change) of 2 Trainer steps from the same seeded SAE."""
    torch.manual_seed(0)
    sae = BATCHTOPK.build(batches[0].shape[1], width, k, None).to(device)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    trainer = Trainer(sae, 10_000, warmup_steps=2, autocast_dtype=getattr(torch, autocast) if autocast else None)
    loss = trainer.update(batches[0].to(device), log=True)["loss"]
    trainer.update(batches[1].to(device))
    return loss, {n: (p.detach() - before[n]).cpu().float() for n, p in sae.named_parameters()}


def rel_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in b)


def step_correctness(train_batches: list[torch.Tensor], tokenizer, sink_ids: list[int], tmp: Path, results: dict) -> None:
    scale = torch.cat(train_batches).norm(dim=1).pow(2).mean().sqrt()  # normalised, as train() feeds the SAEs
    batches = [x_BD / scale for x_BD in train_batches]
    width, k = SIZES["saes"][0]
    checks = {}
    if CUDA:
        loss_cpu, d_cpu = run_steps(torch.device("cpu"), None, batches, width, k)
        for name, autocast in (("cuda-fp32", None), ("cuda-bf16", "bfloat16")):
            loss, d = run_steps(DEVICE, autocast, batches, width, k)
            checks[name] = {"against": "cpu fp32", "loss": loss, "loss_cpu": loss_cpu, "rel_diff": rel_diff(d, d_cpu)}
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        loss_1, d_1 = run_steps(DEVICE, None, batches, width, k)
        torch.set_num_threads(2)
        loss_2, d_2 = run_steps(DEVICE, None, batches, width, k)
        torch.set_num_threads(threads)
        checks["cpu-threads"] = {"against": "1 thread (this: 2)", "loss": loss_2, "loss_cpu": loss_1,
                                 "rel_diff": rel_diff(d_2, d_1)}
    for name, c in checks.items():
        c["tol"] = STEP_TOL[name]
        c["ok"] = c["rel_diff"] <= c["tol"]
    results["step_equality"] = checks

    caches = {}
    for dtype in ("float32", "bfloat16"):
        model = build_model(SIZES["check_model"], getattr(torch, dtype), tokenizer, sink_ids)
        for where, device in (("device", DEVICE), ("cpu", torch.device("cpu"))):
            out = tmp / f"check-{dtype}-{where}"
            recipe = collect_recipe(out, dtype, SIZES["check_context"], SIZES["check_rows"], device.type)
            quiet_collect(recipe, model.to(device), tokenizer)
            with ActivationCache(out) as c:
                caches[dtype, where] = {layer: c.read(layer, include_dropped=True) for layer in c.layers}
    cache_checks = {}
    for dtype in ("float32", "bfloat16"):
        a, b = caches[dtype, "device"], caches[dtype, "cpu"]
        layers = {}
        for layer in b:
            x, y = a[layer]["activations"], b[layer]["activations"]
            layers[layer] = {"bit_identical": x.tobytes() == y.tobytes(), "max_abs_diff": float(np.abs(x - y).max()),
                             "rel_diff": float(np.linalg.norm(x - y) / np.linalg.norm(y)),
                             "kept_sets_identical": bool(np.array_equal(a[layer]["drop_reason"], b[layer]["drop_reason"])),
                             "dropped": int((b[layer]["drop_reason"] != 0).sum()), "tokens": len(y)}
        ok = all(v["kept_sets_identical"] and (v["bit_identical"] if dtype == "float32" else v["rel_diff"] <= BF16_CACHE_TOL)
                 for v in layers.values())
        cache_checks[dtype] = {"compared": f"{DEVICE.type} vs cpu", "layers": layers, "ok": ok,
                               "rule": "bit-identical" if dtype == "float32" else f"rel diff <= {BF16_CACHE_TOL}"}
    results["cache_equality"] = cache_checks


def print_table(r: dict) -> None:
    c, t = r["collection"], r["training"]
    print(f"GPU check on {r['device']} (torch {r['torch']}, {r['date']}){'' if CUDA else ': no CUDA, reduced CPU run'}")
    print(f"{'figure':<70}{'value':>16}")
    print(f"{'collection: bare forward tokens/s (' + c['dtype'] + ')':<70}{c['bare_forward_tok_s']:>16,.0f}")
    print(f"{'collection: collect() 3 layers ' + str(c['layers']) + ' tokens/s':<70}{c['collect_tok_s']:>16,.0f}")
    print(f"{'collection: collect / bare':<70}{c['ratio_vs_bare']:>16.3f}")
    print(f"{'training: one train() pass, all four, tokens/s':<70}{t['one_pass_all_four_tok_s']:>16,.0f}")
    for key, s in t["per_sae"].items():
        ref = s.get("dictionary_learning_tok_s")
        print(f"{'  width/k ' + key + ' workbench tokens/s':<70}{s['workbench_tok_s']:>16,.0f}")
        print(f"{'  width/k ' + key + ' dictionary_learning tokens/s':<70}{f'{ref:,.0f}' if ref else t['reference']:>16}")
        print(f"{'  width/k ' + key + ' encoder-product floor tokens/s':<70}{s['encoder_floor_tok_s']:>16,.0f}")
    for name, s in r["step_equality"].items():
        label = f"step {name} vs {s['against']}, rel diff (tol {s['tol']:g})"
        print(f"{label:<70}{s['rel_diff']:>12.2e} {'ok' if s['ok'] else 'FAIL':>3}")
    for dtype, s in r["cache_equality"].items():
        worst = max(v["rel_diff"] for v in s["layers"].values())
        kept = all(v["kept_sets_identical"] for v in s["layers"].values())
        label = f"cache {dtype} {s['compared']} ({s['rule']}), kept {'same' if kept else 'DIFFER'}, rel diff"
        print(f"{label:<70}{worst:>12.2e} {'ok' if s['ok'] else 'FAIL':>3}")


def main() -> None:
    results: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu (no CUDA device)",
                     "torch": torch.__version__, "date": datetime.date.today().isoformat(), "cuda": CUDA,
                     "model_config": "https://huggingface.co/Qwen/Qwen3-1.7B/blob/main/config.json",
                     "model_overrides": SIZES["model"]}
    tokenizer = load_tokenizer(ModelConfig(name="embedded:tiny-qwen3"))
    sink_ids = pick_sink_tokens(SPECS["tiny-qwen3"], tokenizer, corpus_documents())
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        cache, layer = step_collection(tmp, tokenizer, sink_ids, results)
        train_batches = step_training(cache, layer, tmp, results)
        step_correctness(train_batches, tokenizer, sink_ids, tmp, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results)
    out = REPO / "bench" / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
