"""Tiny models and tokenizers built locally (no hub), for the demo, the tests and the benchmarks.

`model.name: embedded:tiny-qwen3` in a recipe builds (once, seeded, deterministic) a real Qwen3
architecture model with random weights and a byte-level BPE tokenizer trained on the shipped corpus,
saves them with `save_pretrained` under `checkpoints/embedded/<name>/`, and from then on they load
through the same `AutoModelForCausalLM` / `AutoTokenizer` path as a hub model.

A few token embeddings are scaled up so the residual stream of those tokens is orders of magnitude
above the median, like the attention sinks of Qwen models: the sink filter has real work to do.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from workbench.errors import WorkbenchError

PREFIX = "embedded:"
CORPUS_PATH = Path(__file__).parent / "assets" / "corpus.txt"
INFO_FILE = "workbench_embedded.json"


@dataclass(frozen=True)
class EmbeddedSpec:
    arch: str  # qwen3 | gemma3
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int = 1024
    max_positions: int = 1024
    num_sink_tokens: int = 3
    sink_frequency: float = 0.002  # pick sink tokens that make up about this share of the corpus each
    sink_scale: float = 300.0  # sink embedding norm, in multiples of the median embedding norm
    seed: int = 0


SPECS: dict[str, EmbeddedSpec] = {
    "tiny-qwen3": EmbeddedSpec("qwen3", 64, 4, 4, 2, 16, 128),
    "tiny-gemma3": EmbeddedSpec("gemma3", 64, 6, 4, 1, 16, 128),
    # Big enough that the forward dominates collection cost (the collection benchmark).
    "bench-qwen3": EmbeddedSpec("qwen3", 512, 8, 8, 4, 64, 1536),
}


def corpus_documents() -> list[str]:
    """The shipped corpus: one document a line (synthetic English from a seeded template grammar)."""
    return [line for line in CORPUS_PATH.read_text().splitlines() if line.strip()]


def embedded_root() -> Path:
    return Path(os.environ.get("WORKBENCH_EMBEDDED_DIR", "checkpoints/embedded"))


def resolve_model_path(name: str) -> str:
    """A recipe's model.name as something `from_pretrained` takes: embedded names are built on first use."""
    if not name.startswith(PREFIX):
        return name
    key = name[len(PREFIX):]
    if key not in SPECS:
        raise WorkbenchError(f"unknown embedded model '{name}': choose one of {', '.join(PREFIX + k for k in SPECS)}")
    path = embedded_root() / key
    if not (path / INFO_FILE).is_file():
        build(key, path)
    return str(path)


def _special_tokens(arch: str) -> dict[str, str]:
    if arch == "qwen3":  # Qwen: no BOS; <|endoftext|> ends documents and pads
        return {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    return {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}


def build_tokenizer(arch: str, vocab_size: int, documents: list[str]):
    """A byte-level BPE tokenizer trained on the documents, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = _special_tokens(arch)
    names = list(dict.fromkeys(special.values()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=names, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    if "bos_token" in special:  # Gemma prepends <bos> to every encoded text
        bos = special["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, **special)


def _model_config(spec: EmbeddedSpec, tokenizer):
    common = dict(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common)
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**common, sliding_window=64)


def _pick_sink_tokens(spec: EmbeddedSpec, tokenizer, documents: list[str]) -> list[int]:
    """Ordinary tokens whose corpus share is nearest to spec.sink_frequency (deterministic)."""
    counts: Counter[int] = Counter()
    for doc in documents:
        counts.update(tokenizer(doc, add_special_tokens=False)["input_ids"])
    total = sum(counts.values())
    specials = set(tokenizer.all_special_ids)
    ranked = sorted(
        (tid for tid in counts if tid not in specials),
        key=lambda tid: (abs(counts[tid] / total - spec.sink_frequency), tid),
    )
    return sorted(ranked[: spec.num_sink_tokens])


def build(key: str, path: Path) -> None:
    """Build an embedded model and tokenizer into `path` (atomically: a half-built folder never counts)."""
    from transformers import AutoModelForCausalLM

    spec = SPECS[key]
    documents = corpus_documents()
    tokenizer = build_tokenizer(spec.arch, spec.vocab_size, documents)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(_model_config(spec, tokenizer))
    sink_ids = _pick_sink_tokens(spec, tokenizer, documents)
    with torch.no_grad():
        emb_VD = model.get_input_embeddings().weight
        median_norm = emb_VD.norm(dim=1).median()
        for tid in sink_ids:
            emb_VD[tid] = emb_VD[tid] / emb_VD[tid].norm() * median_norm * spec.sink_scale
    # One folder per process: under `accelerate launch` every process may build at once. The build is
    # deterministic, so whichever finishes first wins and the others discard theirs.
    tmp = path.with_name(f"{path.name}.building-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / INFO_FILE).write_text(json.dumps({"name": PREFIX + key, "spec": asdict(spec), "sink_token_ids": sink_ids}, indent=2))
    if path.exists() and not (path / INFO_FILE).is_file():
        shutil.rmtree(path)  # a folder that is not a finished build
    try:
        os.rename(tmp, path)
    except OSError:
        if not (path / INFO_FILE).is_file():
            raise
        shutil.rmtree(tmp)  # another process finished first


def sink_token_ids(model_path: str) -> list[int]:
    """The planted sink tokens of an embedded model (for tests and the demo's summary)."""
    return json.loads((Path(model_path) / INFO_FILE).read_text())["sink_token_ids"]
