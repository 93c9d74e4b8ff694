"""Collection under faults: a model that gives NaN/Inf, Ctrl-C and SIGTERM at any moment, two collects on
one folder, data files that are not what they claim, a document of 20 MB on one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import accelerate_two_cpu_processes

from workbench import data as data_mod
from workbench.cache import ActivationCache, shard_is_complete, verify_shard
from workbench.cli import main
from workbench.collect import collect
from workbench.config import DataConfig, ModelConfig, load_recipe
from workbench.data import iter_documents, iter_rows
from workbench.embedded import resolve_model_path
from workbench.model import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "workbench" / "assets" / "corpus.txt"
SMALL = ["data.context_length=64", "data.num_tokens=512", "collect.batch_size=4", "collect.layers=[1]"]
# 24 batches of 2 rows of 64 tokens, one batch a shard: 24 shards.
SHARDS24 = ["data.context_length=64", "data.num_tokens=3072", "collect.batch_size=2", "collect.shard_batches=1",
            "collect.layers=[1,3]"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _error_line(stderr: str, command: str = "collect") -> str:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"workbench {command}: error: ")
    return lines[0]


def _cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


def _same_contents(a: Path, b: Path) -> None:
    with ActivationCache(a) as ca, ActivationCache(b) as cb:
        assert ca.manifest["summary"] == cb.manifest["summary"]
        for layer in ca.layers:
            ra, rb = ca.read(layer, include_dropped=True), cb.read(layer, include_dropped=True)
            assert all(np.array_equal(ra[k], rb[k]) for k in ra), layer


def _workbench(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---- a model that gives non-finite activations -------------------------------------------------------

MARK = "\u00a7"  # a character the corpus never has: its last byte is a token of its own


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny Qwen3 model with the embedding of MARK's last byte token set to NaN ("nan"), or to
    1e6, finite in float32 but beyond float16 ("huge"): real models, saved with save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("embedded:tiny-qwen3")
    tok = AutoTokenizer.from_pretrained(path)
    mark_id = tok(MARK, add_special_tokens=False)["input_ids"][-1]
    corpus_ids = set(tok(CORPUS.read_text(), add_special_tokens=False)["input_ids"])
    assert mark_id not in corpus_ids
    out = {}
    for name, value in (("nan", float("nan")), ("huge", 1e6)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            model.get_input_embeddings().weight[mark_id] = value
        folder = tmp_path_factory.mktemp(f"model_{name}")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = folder
    return out


def _marked_docs(path: Path, marked: int) -> str:
    """40 corpus lines, one document a row in padded mode; document `marked` has MARK in it. Returns it."""
    lines = CORPUS.read_text().splitlines()[:40]
    words = lines[marked].split()
    lines[marked] = " ".join([*words[:5], MARK, *words[5:]])
    path.write_text("\n".join(lines) + "\n")
    return lines[marked]


@pytest.mark.parametrize("model,store,where,fix", [
    # A NaN key reaches every query of its row: the causal mask is added to the scores, and NaN + -inf is NaN.
    ("nan", "model", "at 32 token(s): sequence 20 position 0, sequence 20 position 1, sequence 20 position 2 and 29 more",
     "the model computes them in float32: check its weights ({model}) for NaN or Inf"),
    ("huge", "float16", "at 1 token(s): sequence 20 position {position};",
     "they are finite in the model's float32 but beyond the range of collect.store_dtype float16: "
     "set collect.store_dtype=bfloat16 or float32"),
])
def test_non_finite_activations_stop_collection_naming_them_and_are_never_stored(tmp_path, capsys, broken_models,
                                                                               model, store, where, fix):
    docs = tmp_path / "docs.txt"
    marked = _marked_docs(docs, 20)  # row 20: forward batch 5 (4 rows a batch), shard 2 (2 batches a shard)
    tok = load_tokenizer(ModelConfig(name=str(broken_models[model])))
    position = tok(marked)["input_ids"].index(tok(MARK, add_special_tokens=False)["input_ids"][-1])
    out = tmp_path / "cache"
    rc, err = _cli(capsys, "collect", str(REPO / "recipes/demo.yaml"), f"model.name={broken_models[model]}",
                   f"data.path={docs}", "data.packing=false", "data.context_length=32", "data.num_tokens=1280",
                   "collect.batch_size=4", "collect.shard_batches=2", "collect.layers=[1,3]",
                   f"collect.store_dtype={store}", f"collect.out={out}")
    line = _error_line(err)
    assert rc == 2
    assert "layer 1 gave non-finite activations (NaN or Inf) in forward batch 5, " in line
    assert where.format(position=position) in line
    assert fix.format(model=broken_models[model]) in line
    assert "nothing non-finite was stored and the finished shards are kept" in line
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == ["shard_000000.h5", "shard_000001.h5"]  # the failing shard 2 is not finalised
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    for name in shards:
        path = out / "shards" / name
        expect = {"layers": [1, 3], "d_model": 64, "store_dtype": "float32" if store == "model" else store,
                  "num_tokens": None}
        with h5py.File(path, "r") as h5:
            expect["num_tokens"] = int(h5.attrs["num_tokens"])
            for layer in (1, 3):
                assert np.isfinite(h5[f"layer_{layer}/activations"][:].astype(np.float32)).all()
        assert shard_is_complete(path) and verify_shard(path, None, expect).verified


# ---- Ctrl-C and SIGTERM ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of SHARDS24."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    collect(load_recipe(REPO / "recipes/demo.yaml", [*SHARDS24, f"collect.out={out}"]))
    return out


def _finished(out: Path) -> int:
    shards = out / "shards"
    return len(list(shards.glob("*.h5"))) if shards.is_dir() else 0


# (signal, shards complete when it is sent, delay after that): as the first shard is being written, or as
# the 1st, 4th, 7th or 10th of 24 has just been renamed complete (the writer thread fsyncing, creating the
# next shard, or idle). The fast suite sends SIGINT and SIGTERM at two of them; the slow one all five.
MOMENTS = [(signal.SIGINT, 0, 0.0), (signal.SIGINT, 1, 0.0), (signal.SIGINT, 4, 0.003),
           (signal.SIGTERM, 7, 0.0), (signal.SIGINT, 10, 0.011)]


@pytest.mark.parametrize("moments", [pytest.param([MOMENTS[1], MOMENTS[3]], id="two"),
                                     pytest.param(MOMENTS, id="five", marks=pytest.mark.slow)])
def test_sigint_and_sigterm_at_any_moment_end_collection_with_exit_130_and_it_resumes(tmp_path, reference, moments):
    """Runs at once, each signalled at its own moment (MOMENTS). Each must print the one line, exit 130
    (not -6 SIGABRT or -11 SIGSEGV, not 0 after swallowing the signal), leave no .partial, and resume to
    the reference."""
    resolve_model_path("embedded:tiny-qwen3")  # built once, not by several processes at once
    runs = []
    for i, (sig, shards, delay) in enumerate(moments):
        out = tmp_path / f"cache{i}"
        proc = subprocess.Popen(_workbench("collect", "recipes/demo.yaml", *SHARDS24, f"collect.out={out}"), cwd=REPO,
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        runs.append({"proc": proc, "out": out, "sig": sig, "shards": shards, "delay": delay, "sent": None})
    deadline = time.monotonic() + 900  # interpreters starting at once on two busy cores can take minutes
    while any(r["sent"] is None for r in runs):
        assert time.monotonic() < deadline, "collection did not start"
        for r in runs:
            started = (r["out"] / "shards").is_dir() and any((r["out"] / "shards").iterdir())
            if r["sent"] is None and started and _finished(r["out"]) >= r["shards"]:
                assert r["proc"].poll() is None, f"run {r} ended before it was signalled"
                time.sleep(r["delay"])
                r["proc"].send_signal(r["sig"])
                r["sent"] = _finished(r["out"])
        time.sleep(0.001)

    for r in runs:
        stderr = r["proc"].communicate(timeout=600)[1]
        assert r["proc"].returncode == 130, (r["proc"].returncode, stderr[-3000:])
        assert stderr.count("workbench collect: interrupted; re-run the same command to resume") == 1, stderr[-3000:]
        for bad in ("Traceback", "terminate called", "Exception ignored", "Segmentation", "core dumped"):
            assert bad not in stderr, stderr[-3000:]
        out = r["out"]
        assert not list((out / "shards").glob("*.partial"))
        finished = sorted((out / "shards").glob("*.h5"))
        assert len(finished) < 24 and not json.loads((out / "manifest.json").read_text())["complete"]
        assert all(shard_is_complete(p) for p in finished)

        summary = collect(load_recipe(REPO / "recipes/demo.yaml", [*SHARDS24, f"collect.out={out}"]))
        assert summary.tokens_this_run == 128 * (24 - len(finished))  # finished shards are not redone
        _same_contents(out, reference)


# ---- two collects on one folder --------------------------------------------------------------------

def test_a_second_collect_on_the_same_folder_fails_at_once_and_the_first_finishes(tmp_path, capsys, reference):
    """The first collection is paused (SIGSTOP) once it is writing shards, so that it surely still runs
    (and holds the folder) while the second is tried; resumed (SIGCONT), it finishes the cache."""
    resolve_model_path("embedded:tiny-qwen3")
    out = tmp_path / "cache"
    first = subprocess.Popen(_workbench("collect", "recipes/demo.yaml", *SHARDS24, f"collect.out={out}"), cwd=REPO,
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while _finished(out) < 1:
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    first.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        rc, err = _cli(capsys, "collect", str(REPO / "recipes/demo.yaml"), *SHARDS24, f"collect.out={out}")
        assert rc == 2 and time.monotonic() - start < 10  # at once: before the model is loaded
        line = _error_line(err)
        assert f"{out} is in use by workbench collect (pid {first.pid}); wait for it to finish" in line
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    _same_contents(out, reference)  # the second changed nothing the first wrote
    rc, _ = _cli(capsys, "collect", str(REPO / "recipes/demo.yaml"), *SHARDS24, f"collect.out={out}")
    assert rc == 0  # the lock went with the first process


# ---- data files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,content,message", [
    ("docs.txt", b"line one\nline two\ncaf\xe9 au lait\n", "docs.txt:3 is not UTF-8 text (invalid continuation byte)"),
    ("docs.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "docs.txt:1 is not UTF-8 text (invalid start byte)"),
    ("docs.txt", b"some text\n\x00\x00\x01\x02binary\n", "docs.txt:2 holds a NUL byte: the file is binary"),
    ("docs.jsonl", b'{"text": "fine"}\n7\n', "docs.jsonl:2 is a JSON number, not an object"),
    ("docs.jsonl", b'["a", "b"]\n', "docs.jsonl:1 is a JSON array, not an object"),
    ("docs.jsonl", b'"text"\n', "docs.jsonl:1 is a JSON string, not an object"),
    ("docs.jsonl", b'{"body": "x"}\n', "docs.jsonl:1 has no key 'text'; set data.text_key"),
    ("docs.jsonl", b'{"text": "ok"}\n\n{"text": null}\n', "docs.jsonl:3 has a JSON null under 'text', not a string"),
    ("docs.jsonl", b'{"text": ["a"]}\n', "docs.jsonl:1 has a JSON array under 'text', not a string"),
    ("docs.jsonl", b'{"text": "a"\n', "docs.jsonl:1 is not valid JSON (Expecting ',' delimiter)"),
])
def test_a_bad_data_file_is_one_line_naming_file_and_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "cache"
    rc, err = _cli(capsys, "collect", str(REPO / "recipes/demo.yaml"), *SMALL, f"data.path={path}", f"collect.out={out}")
    line = _error_line(err)
    assert rc == 2 and str(tmp_path / message) in line and ("fix or remove that line" in line or "data.text_key" in line
                                                            or "remove it from data.path" in line)
    assert not out.exists()


# ---- long documents --------------------------------------------------------------------------------

LONG_DOC = """
import json, resource, sys, time
from workbench.config import DataConfig, ModelConfig
from workbench.data import iter_rows
from workbench.model import load_tokenizer
tok = load_tokenizer(ModelConfig(name="embedded:tiny-qwen3"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
cfg = DataConfig(path=sys.argv[1], context_length=128, num_tokens=8192, packing=sys.argv[2] == "packed")
rows = list(iter_rows(cfg, tok))
print(json.dumps({"seconds": time.perf_counter() - start, "rows": rows,
                  "peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


@pytest.mark.parametrize("packing", ["packed", pytest.param("padded", marks=pytest.mark.slow)])
def test_a_20_mb_single_line_document_gives_its_first_rows_fast_and_in_flat_memory(tmp_path, packing):
    """Tokenising it whole took about 140 MiB and 2.2 s per MB of text here (a 5 MB line: 669 MiB, 11.3 s)."""
    resolve_model_path("embedded:tiny-qwen3")
    words = CORPUS.read_text().split()
    text = " ".join(words * (20_000_000 // len(" ".join(words)) + 1))[:20_000_000]
    path = tmp_path / "long.txt"
    path.write_text(text + "\n")
    proc = subprocess.run([sys.executable, "-c", LONG_DOC, str(path), packing], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    # The line itself is 20 MB as a str, plus the read buffer; tokenised whole it took about 2.8 GB.
    assert result["peak_mib"] < 250 and result["seconds"] < 20, (result["peak_mib"], result["seconds"])
    tok = load_tokenizer(ModelConfig(name="embedded:tiny-qwen3"))
    head = text[: text.index(" ", 200_000)]  # a prefix cut before a space: its first tokens are the document's
    want = tok(head, add_special_tokens=False)["input_ids"]
    if packing == "packed":
        assert result["rows"] == [want[i * 128: (i + 1) * 128] for i in range(64)]
    else:  # one document, one row
        assert result["rows"] == [want[:128]]


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_pieces_give_the_tokens_of_the_whole_document(monkeypatch, tmp_path, arch):
    """With pieces of 1,000 characters, a 100,000-character document with runs of spaces, tabs and
    newlines gives the same rows as tokenising it whole (byte-level BPE: cuts go before a space)."""
    tok = load_tokenizer(ModelConfig(name=f"embedded:tiny-{arch}"))
    lines = CORPUS.read_text().splitlines()
    doc = ""
    for i, line in enumerate(lines):
        doc += line + ("\n\n" if i % 7 == 0 else "  \t " if i % 5 == 0 else ". ")
        if len(doc) > 100_000:
            break
    path = tmp_path / "docs.jsonl"  # a .jsonl document may hold newlines
    path.write_text(json.dumps({"text": doc}) + "\n" + json.dumps({"text": lines[-1]}) + "\n")
    monkeypatch.setattr(data_mod, "PIECE_CHARS", 1000)
    cfg = DataConfig(path=str(path), context_length=50, num_tokens=50 * 10**6)
    rows = list(iter_rows(cfg, tok))
    stream = []
    for d in iter_documents(cfg):
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    body = 50 - (tok.bos_token_id is not None)
    assert len(rows) > 300  # about 19,000 tokens, from 100 pieces
    assert [r[-body:] for r in rows] == [stream[i:i + body] for i in range(0, len(stream) - body + 1, body)]
    padded = DataConfig(path=str(path), context_length=300, num_tokens=300 * 10, packing=False)
    assert list(iter_rows(padded, tok)) == [tok(d, truncation=True, max_length=300)["input_ids"]
                                            for d in iter_documents(padded)]


@pytest.mark.slow  # one process redoing a corrupt shard is test_cache_faults.py's fast proof
def test_two_processes_redo_a_corrupt_shard_of_a_complete_cache(tmp_path, reference):
    """Under `accelerate launch` each process verifies its own shards, all learn the whole list, the
    main process (the only one holding the folder's lock) reopens the cache and the owner redoes it."""
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    shard = out / "shards" / "shard_000005.h5"  # process 1 of 2 owns it
    with h5py.File(shard, "r") as h5:
        offset = int(h5["layer_3/activations"].id.get_chunk_info(0).byte_offset) + 500
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * 64)
    launch, env = accelerate_two_cpu_processes(tmp_path)
    proc = subprocess.run([*launch, "collect", "recipes/demo.yaml", *SHARDS24, f"collect.out={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("redoing 1 missing or damaged shard(s): shard_000005.h5 (layer_3/activations rows 0..") == 1
    with h5py.File(shard, "r") as h5:
        assert (int(h5.attrs["process_index"]), int(h5.attrs["num_processes"])) == (1, 2)
    _same_contents(out, reference)
