"""Tiny models and tokenizers built locally (no hub), for the demo, the tests and the benchmarks.

`model.name: embedded:tiny-qwen3` in a recipe builds (once, deterministic) a real Qwen3 architecture
model and a byte-level BPE tokenizer trained on the shipped corpus, saves them with `save_pretrained`
under `checkpoints/embedded/<name>/`, and from then on they load through the same
`AutoModelForCausalLM` / `AutoTokenizer` path as a hub model.

tiny-qwen3 and tiny-gemma3 are language models trained on the corpus: their weights are committed
(`assets/<name>.safetensors`, made by `python -m workbench.embedded_train`), so every machine builds
the same model without training. bench-qwen3 (for timing only) keeps seeded random weights.

A few tokens are planted as sinks: their embedding holds a massive value in one channel (SINK_CHANNEL),
like the massive activations of real LLMs, so their residual stream is tens of times the median and the
sink filter has real work to do. The final norm's weight on that channel is zero, as real models learn
to nearly ignore it there; the trained models learned around the fixed sinks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from workbench.errors import WorkbenchError

PREFIX = "embedded:"
ASSETS = Path(__file__).parent / "assets"
CORPUS_PATH = ASSETS / "corpus.txt"
INFO_FILE = "workbench_embedded.json"
# Raised whenever what build() writes changes (2: trained weights, one-channel sinks), so that a folder
# an older version built is rebuilt instead of silently used.
BUILD_VERSION = 2
TRAINED = ("tiny-qwen3", "tiny-gemma3")  # built from committed weights; the others keep random weights
SINK_CHANNEL = 0


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
    # The sink embedding's SINK_CHANNEL value, in multiples of the median embedding norm at init: big
    # enough that the sinks stay tens of times the median residual norm once training has grown it.
    sink_scale: float = 10000.0
    seed: int = 0


SPECS: dict[str, EmbeddedSpec] = {
    "tiny-qwen3": EmbeddedSpec("qwen3", 64, 4, 4, 2, 16, 128),
    # Gemma scales embeddings by sqrt(hidden_size): a smaller value gives sinks of the same order (~100x).
    "tiny-gemma3": EmbeddedSpec("gemma3", 64, 6, 4, 1, 16, 128, sink_scale=1500.0),
    # Big enough that the forward dominates collection cost (the collection benchmark).
    "bench-qwen3": EmbeddedSpec("qwen3", 512, 8, 8, 4, 64, 1536),
}


def corpus_documents() -> list[str]:
    """The shipped corpus: one document a line (synthetic English from a seeded template grammar)."""
    return [line for line in CORPUS_PATH.read_text().splitlines() if line.strip()]


def embedded_root() -> Path:
    return Path(os.environ.get("WORKBENCH_EMBEDDED_DIR", "checkpoints/embedded"))


def weights_path(key: str) -> Path:
    """The committed trained weights of a TRAINED model."""
    return ASSETS / f"{key}.safetensors"


def _build_id(key: str) -> dict:
    """What a folder must record to count as built by this code from these weights: a retrained
    weights file changes its digest, and a rebuild follows."""
    digest = hashlib.sha256(weights_path(key).read_bytes()).hexdigest() if key in TRAINED else None
    return {"build_version": BUILD_VERSION, "weights_sha256": digest}


def _is_built(path: Path, key: str) -> bool:
    info_path = path / INFO_FILE
    if not info_path.is_file():
        return False
    info = json.loads(info_path.read_text())
    return all(info.get(k) == v for k, v in _build_id(key).items())


def resolve_model_path(name: str) -> str:
    """A recipe's model.name as something `from_pretrained` takes: embedded names are built on first use,
    and rebuilt when the folder is from an older build."""
    if not name.startswith(PREFIX):
        return name
    key = name[len(PREFIX):]
    if key not in SPECS:
        raise WorkbenchError(f"unknown embedded model '{name}': choose one of {', '.join(PREFIX + k for k in SPECS)}")
    path = embedded_root() / key
    if not _is_built(path, key):
        # Under `accelerate launch` every process gets here at once: one builds, the others wait and then
        # find it built. A process that found it built never sees it replaced, since nothing replaces a
        # current build.
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f"{path.name}.lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            if not _is_built(path, key):
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


def pick_sink_tokens(spec: EmbeddedSpec, tokenizer, documents: list[str]) -> list[int]:
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


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the vocabulary in id order: the committed weights record the one they were trained with."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def new_model(spec: EmbeddedSpec, tokenizer, sink_ids: list[int]):
    """The seeded random-weight model with its sinks planted: bench-qwen3, and where training starts.

    A sink's embedding gets sink_scale x the median embedding norm in SINK_CHANNEL (its other channels
    stay as drawn), and the final norm's weight on SINK_CHANNEL is zero (Gemma's norm multiplies by
    1 + weight). Without that zero a sink's residual, normalised, is almost all SINK_CHANNEL, and through
    the tied unembedding it predicts itself with a logit in the hundreds."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(_model_config(spec, tokenizer))
    with torch.no_grad():
        emb_VD = model.get_input_embeddings().weight
        median_norm = emb_VD.norm(dim=1).median()
        emb_VD[sink_ids, SINK_CHANNEL] = median_norm * spec.sink_scale
        model.model.norm.weight[SINK_CHANNEL] = 0.0 if spec.arch == "qwen3" else -1.0
    return model


def _load_trained(model, key: str, tokenizer, sink_ids: list[int]) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_model

    path = weights_path(key)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    if meta["tokenizer_sha256"] != tokenizer_digest(tokenizer) or json.loads(meta["sink_token_ids"]) != sink_ids:
        raise WorkbenchError(f"{path} was trained with another tokenizer than {CORPUS_PATH} now gives (was the "
                             f"corpus edited?); restore the corpus, or retrain with `python -m workbench.embedded_train`")
    load_model(model, str(path))  # strict: every parameter, shape and the tied unembedding


def build(key: str, path: Path) -> None:
    """Build an embedded model and tokenizer into `path` (atomically: a half-built folder never counts).
    The caller holds the build lock."""
    spec = SPECS[key]
    documents = corpus_documents()
    tokenizer = build_tokenizer(spec.arch, spec.vocab_size, documents)
    sink_ids = pick_sink_tokens(spec, tokenizer, documents)
    model = new_model(spec, tokenizer, sink_ids)
    if key in TRAINED:
        _load_trained(model, key, tokenizer, sink_ids)
    tmp = path.with_name(f"{path.name}.building-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"name": PREFIX + key, "spec": asdict(spec), "sink_token_ids": sink_ids, **_build_id(key)}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    if path.exists():  # an older build (or a half-built folder): moved aside, so a kill leaves one or none
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        shutil.rmtree(old)
    os.rename(tmp, path)


def sink_token_ids(model_path: str) -> list[int]:
    """The planted sink tokens of an embedded model (for tests and the demo's summary)."""
    return json.loads((Path(model_path) / INFO_FILE).read_text())["sink_token_ids"]
