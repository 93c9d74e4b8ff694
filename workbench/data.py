"""Text -> token rows -> forward batches.

Documents come from a hub dataset (streamed), a local `.txt` (a document a line), a `.jsonl`
(`data.text_key`), a directory of those, or `embedded:corpus` (the shipped text). Rows are either
packed (documents joined with EOS into full `context_length` rows, each row starting with BOS when the
tokenizer has one; what the Qwen3-era recipes did) or one document a row, right-padded.

Everything here is deterministic: the same recipe gives the same rows in the same order, on every
process, so forward batch b is the same set of sequences whatever the number of processes.

A document longer than PIECE_CHARS characters is tokenised in pieces (see `_pieces`), and no more of it
than the rows still wanted: tokenising a 50 MB line at once took 9.9 GB and 107 s for 8,192 tokens.
Documents up to PIECE_CHARS are tokenised whole, exactly as before.
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
PIECE_CHARS = 1 << 16  # a longer document is tokenised in pieces of at most this many characters
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


def _read_local(path: Path, text_key: str) -> Iterator[str]:
    """The documents of one .txt (a line each) or .jsonl file (text_key of the object on each line).
    A file that is not UTF-8 text, or a .jsonl line that is not an object with a string under
    text_key, is one WorkbenchError naming the file and the line."""
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if "\x00" in line:
                    raise WorkbenchError(f"{path}:{lineno} holds a NUL byte: the file is binary (or UTF-16), not UTF-8 "
                                         "text; convert it to UTF-8 or remove it from data.path")
                if not line.strip():
                    continue
                if path.suffix == ".txt":
                    yield line.rstrip("\n")
                    continue
                yield _jsonl_text(path, lineno, line, text_key)
    except UnicodeDecodeError as err:
        raise WorkbenchError(f"{path}:{_first_bad_utf8_line(path)} is not UTF-8 text ({err.reason}); data.path files "
                             "must be UTF-8: convert it (e.g. `iconv -f latin1 -t utf-8`) or remove it from data.path") from None


def _jsonl_text(path: Path, lineno: int, line: str, text_key: str) -> str:
    fix = "fix or remove that line"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise WorkbenchError(f"{path}:{lineno} is not valid JSON ({err.msg}); each .jsonl line must be one object: {fix}") from None
    if not isinstance(record, dict):
        raise WorkbenchError(f"{path}:{lineno} is a JSON {JSON_TYPES.get(type(record), 'value')}, not an object; each "
                             f".jsonl line must be one object with the text under '{text_key}': {fix}")
    if text_key not in record:
        raise WorkbenchError(f"{path}:{lineno} has no key '{text_key}'; set data.text_key to the text field")
    text = record[text_key]
    if not isinstance(text, str):
        raise WorkbenchError(f"{path}:{lineno} has a JSON {JSON_TYPES.get(type(text), 'value')} under '{text_key}', not a "
                             f"string; set data.text_key to the text field or {fix}")
    return text


def _first_bad_utf8_line(path: Path) -> int:
    """The number of the first line of a file that is not valid UTF-8 (for the error message only)."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 1


def _pieces(doc: str) -> Iterator[tuple[str, bool]]:
    """A document as (piece, is_last) pieces of at most PIECE_CHARS characters, to tokenise one at a time.

    A cut goes just before a space that follows a non-space character. The byte-level BPE pre-tokenizers
    of GPT-2, Llama 3 and Qwen never join a non-space character and the space after it into one
    pre-token, so for them the pieces give exactly the tokens of the whole document; another tokenizer
    (a SentencePiece one, say) may tokenise the few characters at a cut differently. A stretch of
    PIECE_CHARS characters without such a space is cut where it ends (the tokens there may differ).
    """
    start = 0
    while len(doc) - start > PIECE_CHARS:
        cut = doc.rfind(" ", start + 1, start + PIECE_CHARS + 1)
        while cut > start and doc[cut - 1].isspace():  # the first space of a run of whitespace
            cut = doc.rfind(" ", start + 1, cut)
        if cut <= start:
            cut = start + PIECE_CHARS
        yield doc[start:cut], False
        start = cut
    yield doc[start:], True


def _head(tokenizer, doc: str, length: int) -> list[int]:
    """A padded-mode row: the first `length` tokens of a document with its special tokens, as tokenising
    it whole with truncation gives, tokenising no more of a long document than that takes."""
    if len(doc) > PIECE_CHARS:
        prefix, count = [], 0
        for piece, _ in _pieces(doc):
            prefix.append(piece)
            count += len(tokenizer(piece, add_special_tokens=False)["input_ids"])
            if count > length:  # more than fits: the cut is past the row's end
                doc = "".join(prefix)
                break
    return tokenizer(doc, add_special_tokens=True, truncation=True, max_length=length)["input_ids"]


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
    for index, record in enumerate(ds):
        if cfg.text_key not in record:
            raise WorkbenchError(f"dataset '{cfg.path}' has no column '{cfg.text_key}'; set data.text_key")
        text = record[cfg.text_key]
        if not isinstance(text, str):
            raise WorkbenchError(f"dataset '{cfg.path}' record {index} has a {type(text).__name__} in column "
                                 f"'{cfg.text_key}', not text; set data.text_key to the text column")
        yield text


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
            for piece, last in _pieces(doc):
                stream += tokenizer(piece, add_special_tokens=False)["input_ids"]
                if last and eos is not None:
                    stream.append(eos)
                rows = min(len(stream) // body, want - produced)
                for i in range(rows):
                    row = stream[i * body: (i + 1) * body]
                    yield [bos, *row] if bos is not None else row
                produced += rows
                del stream[: rows * body]
                if produced >= want:
                    return
    else:
        for doc in iter_documents(cfg):
            row = _head(tokenizer, doc, length)
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
