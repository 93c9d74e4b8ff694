"""Text -> token rows: packing, padding, local formats, and a corpus shorter than asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import torch_threads

from workbench.cache import ActivationCache
from workbench.cli import main
from workbench.collect import collect
from workbench.config import DataConfig, ModelConfig, load_recipe
from workbench.data import iter_batches, iter_documents, iter_rows, num_rows
from workbench.errors import WorkbenchError
from workbench.model import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return {name: load_tokenizer(ModelConfig(name=f"embedded:tiny-{name}")) for name in ("qwen3", "gemma3")}


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_packed_rows_are_the_token_stream_cut_into_full_rows(tokenizers, arch):
    tok = tokenizers[arch]
    cfg = DataConfig(context_length=50, num_tokens=50 * 30)
    rows = list(iter_rows(cfg, tok))
    assert len(rows) == num_rows(cfg) == 30 and all(len(r) == 50 for r in rows)
    stream = []
    for doc in iter_documents(cfg):
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) > 50 * 30:
            break
    if tok.bos_token_id is None:  # Qwen: no BOS, rows are plain slices of the stream
        assert sum(rows, []) == stream[:50 * 30]
    else:  # Gemma: every row starts with BOS, followed by the next 49 tokens of the stream
        assert all(r[0] == tok.bos_token_id for r in rows)
        assert sum((r[1:] for r in rows), []) == stream[:49 * 30]
    assert rows == list(iter_rows(cfg, tok))  # deterministic


def test_padded_rows_are_one_document_each_truncated_and_batches_pad_right(tokenizers, tmp_path):
    tok = tokenizers["gemma3"]
    docs = tmp_path / "docs.txt"
    docs.write_text("one two\n\n" + " ".join(["word"] * 200) + "\nthree four five\n")
    cfg = DataConfig(path=str(docs), context_length=32, num_tokens=32 * 10, packing=False)
    rows = list(iter_rows(cfg, tok))
    assert [len(r) for r in rows] == [len(tok("one two")["input_ids"]), 32, len(tok("three four five")["input_ids"])]
    assert all(r[0] == tok.bos_token_id for r in rows)
    (batch,) = iter_batches(iter(rows), 4, tok.pad_token_id)
    assert batch.input_ids_BL.shape == (3, 32) and batch.sequence_B.tolist() == [0, 1, 2]
    assert batch.attention_mask_BL.sum(1).tolist() == [len(r) for r in rows]
    assert (batch.input_ids_BL[0, len(rows[0]):] == tok.pad_token_id).all()


def test_jsonl_files_and_directories_are_read_in_a_fixed_order(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.jsonl").write_text(json.dumps({"body": "second"}) + "\n" + json.dumps({"body": "third"}) + "\n")
    (folder / "a.txt").write_text("first\n")
    (folder / "sub" / "c.txt").write_text("fourth\n")
    (folder / "ignored.csv").write_text("x\n")
    assert list(iter_documents(DataConfig(path=str(folder), text_key="body"))) == ["first", "second", "third", "fourth"]
    with pytest.raises(WorkbenchError, match=r"b.jsonl:1 has no key 'text'; set data.text_key"):
        list(iter_documents(DataConfig(path=str(folder))))
    (folder / "b.jsonl").write_text("{not json\n")
    with pytest.raises(WorkbenchError, match=r"b.jsonl:1 is not valid JSON"):
        list(iter_documents(DataConfig(path=str(folder), text_key="body")))


def test_a_corpus_shorter_than_num_tokens_is_collected_with_a_warning_and_recorded(tmp_path, capsys):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join((REPO / "workbench/assets/corpus.txt").read_text().splitlines()[:12]) + "\n")
    with torch_threads(1):
        summary = collect(load_recipe(None, [f"data.path={docs}", "data.context_length=64", "data.num_tokens=1000000",
                                             "collect.layers=[3]", f"collect.out={tmp_path / 'cache'}"]))
    out = capsys.readouterr().out
    rows = summary.sequences
    assert 0 < rows < 15625 and summary.ran_out and summary.tokens == rows * 64
    assert f"warning: the data ran out: {rows:,} of the 15,625 requested rows (data.num_tokens 1,000,000) were read" in out
    with ActivationCache(tmp_path / "cache") as cache:
        m = cache.manifest
        assert (m["requested_rows"], m["requested_tokens"]) == (15625, 1_000_000)
        assert (m["summary"]["sequences"], m["summary"]["tokens"]) == (rows, rows * 64)
        assert len(cache.read(3, include_dropped=True)["sequence"]) == rows * 64
    assert main(["inspect", str(tmp_path / "cache")]) == 0
    assert f"the data ran out: {rows:,} of the 15,625 requested rows were read" in capsys.readouterr().out


def test_the_summary_counts_add_up_to_the_tokens_read(tmp_path, capsys):
    with torch_threads(1):
        summary = collect(load_recipe(REPO / "recipes/demo.yaml", ["data.num_tokens=4096", "collect.shard_batches=1",
                                                                   f"collect.out={tmp_path / 'cache'}"]))
    out = capsys.readouterr().out
    assert summary.tokens == 4096 and summary.sequences == 32 and summary.shards == 2 and not summary.ran_out
    assert summary.tokens_this_run == 4096 and summary.seconds > 0
    assert summary.bytes == sum(p.stat().st_size for p in (tmp_path / "cache" / "shards").iterdir())
    for layer in (2, 3):
        s = summary.layers[layer]
        assert s.kept + s.first_token + s.sink == 4096 and s.first_token == 32 and s.sink > 0
        assert f"{layer:>6} {s.kept:>12,} {s.first_token:>12,} {s.sink:>10,}" in out
    assert "tokens read 4,096 in 32 sequences, 2 shards" in out and "tokens/s" in out
