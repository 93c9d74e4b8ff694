"""Text -> token rows -> forward batches.

Documents come from a hub dataset (streamed), a local `.txt` (a document a line), a `.jsonl`
(`data.text_key`), a directory of those, or `embedded:corpus` (the shipped text). Rows are either
packed (documents joined with EOS into full `context_length` rows, each row starting with BOS when the
tokenizer has one; what the Qwen3-era recipes did) or one document a row, right-padded.

Everything here is deterministic: the same recipe gives the same rows in the same order, on every
process, so forward batch b is the same set of sequences whatever the number of processes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.config import DataConfig
from workbench.embedded import PREFIX, corpus_documents
from workbench.errors import WorkbenchError

LOCAL_SUFFIXES = (".txt", ".jsonl")


def _read_local(path: Path, text_key: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                yield line.rstrip("\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise WorkbenchError(f"{path}:{lineno} is not valid JSON; each .jsonl line must be one object") from None
            if text_key not in record:
                raise WorkbenchError(f"{path}:{lineno} has no key '{text_key}'; set data.text_key to the text field")
            yield str(record[text_key])


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """The documents of the recipe's data source, in a fixed order."""
    if cfg.path == PREFIX + "corpus":
        yield from corpus_documents()
        return
    path = Path(cfg.path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise WorkbenchError(f"data.path {path} holds no .txt or .jsonl files")
        for file in files:
            yield from _read_local(file, cfg.text_key)
        return
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise WorkbenchError(f"data.path {path} does not exist; give a .txt/.jsonl file, a directory or a hub dataset id")
        yield from _read_local(path, cfg.text_key)
        return
    if path.exists() or cfg.path.startswith((".", "/")):
        raise WorkbenchError(f"data.path {path} is not a .txt/.jsonl file or a directory of them")
    yield from _hub_documents(cfg)


def _hub_documents(cfg: DataConfig) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, streaming=cfg.streaming)
    except Exception as err:  # datasets raises many types for a missing or unreachable dataset
        raise WorkbenchError(f"cannot load dataset '{cfg.path}': {str(err).splitlines()[0]} "
                             "(check data.path, or use a local .txt/.jsonl file)") from None
    for record in ds:
        if cfg.text_key not in record:
            raise WorkbenchError(f"dataset '{cfg.path}' has no column '{cfg.text_key}'; set data.text_key")
        yield record[cfg.text_key]


def num_rows(cfg: DataConfig) -> int:
    """Rows to read: ceil(num_tokens / context_length)."""
    return math.ceil(cfg.num_tokens / cfg.context_length)


def iter_rows(cfg: DataConfig, tokenizer) -> Iterator[list[int]]:
    """Token rows (unpadded lists), at most num_rows(cfg) of them: fewer when the data runs out (the
    caller can tell by counting; collection warns and records it). Packed rows are exactly
    context_length long; padded-mode rows are one document each, truncated to context_length."""
    want = num_rows(cfg)
    produced = 0
    length = cfg.context_length
    if cfg.packing:
        bos = tokenizer.bos_token_id
        eos = tokenizer.eos_token_id
        body = length - (1 if bos is not None else 0)
        stream: list[int] = []
        for doc in iter_documents(cfg):
            stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
            if eos is not None:
                stream.append(eos)
            while len(stream) >= body and produced < want:
                row, stream = stream[:body], stream[body:]
                yield [bos, *row] if bos is not None else row
                produced += 1
            if produced >= want:
                return
    else:
        for doc in iter_documents(cfg):
            row = tokenizer(doc, add_special_tokens=True, truncation=True, max_length=length)["input_ids"]
            if row:
                yield row
                produced += 1
            if produced >= want:
                return
    if produced == 0 and cfg.packing:
        raise WorkbenchError(f"data.path {cfg.path} gave no complete row of {length} tokens: the corpus is empty or "
                             "too short (add text or lower data.context_length)")
    if produced == 0:
        raise WorkbenchError(f"data.path {cfg.path} gave no document with any tokens: the corpus is empty (add text)")


@dataclass
class Batch:
    """One forward batch: global index, the global sequence index of each row, and model inputs."""

    index: int
    sequence_B: torch.Tensor  # int64 [B]
    input_ids_BL: torch.Tensor  # int64 [B, L]
    attention_mask_BL: torch.Tensor  # int64 [B, L], 0 = padding


def iter_batches(rows: Iterator[list[int]], batch_size: int, pad_token_id: int) -> Iterator[Batch]:
    """Group rows into batches of batch_size (the last may be smaller), right-padded to the longest row."""
    pending: list[list[int]] = []
    first_seq = 0
    index = 0
    for row in rows:
        pending.append(row)
        if len(pending) == batch_size:
            yield _make_batch(index, first_seq, pending, pad_token_id)
            first_seq += len(pending)
            index += 1
            pending = []
    if pending:
        yield _make_batch(index, first_seq, pending, pad_token_id)


def _make_batch(index: int, first_seq: int, rows: list[list[int]], pad_token_id: int) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return Batch(index, torch.arange(first_seq, first_seq + len(rows)), ids, mask)
