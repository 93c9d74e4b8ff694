"""The feature pages in a real browser: headless Chromium (Debian's `chromium` package) opens index.html and
a latent page from disk, offline, runs the index's script, and the DOM it leaves holds every latent id in the
requested order, the search's matches, and the highlighted example tokens; a screenshot of each page is saved
under the test's temporary directory."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from workbench.cli import main
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.formats import dictionary_learning as dl
from workbench.sae import BatchTopKSAE

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
F = 96


def chromium() -> str:
    found = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    if found is None:
        pytest.fail("headless Chromium is missing: install Debian's chromium package (apt-get install chromium); "
                    "this test drives the generated pages in a real browser")
    return found


def browse(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on `url`, with networking off: every host fails to resolve."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp / 'chromium-profile'}", *extra, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def dump_dom(url: str, tmp: Path) -> str:
    return browse(url, tmp, "--dump-dom").stdout


def screenshot(url: str, tmp: Path, name: str) -> Path:
    path = tmp / name
    browse(url, tmp, f"--screenshot={path}", "--window-size=1200,900")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, path
    return path


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("browser")
    cache = root / "cache"
    collect(load_recipe(REPO / "recipes" / "demo.yaml", [f"collect.out={cache}", "data.num_tokens=4096"]))
    torch.manual_seed(0)
    sae = BatchTopKSAE(64, F, 8)
    with torch.no_grad():
        sae.threshold.fill_(0.05)
    trainer = dl.trainer_section(sae, lr=1e-3, steps=10, auxk_alpha=0.0, warmup_steps=0, decay_start=None,
                                 threshold_beta=0.999, threshold_start_step=1, seed=0, device="cpu", layer=2,
                                 lm_name="embedded:tiny-qwen3")
    folder = root / "sae"
    dl.save_folder(sae, folder, {"trainer": trainer, "buffer": dl.buffer_section(64, 128, 1, 16, 512, "cpu"),
                                 "workbench": {"cache": str(cache), "sink_multiple": 10.0}})
    out = root / "pages"
    assert main(["features", str(folder), "--out", str(out), "--top", "8"]) == 0  # the cache the SAE records
    return {"out": out, "doc": json.loads((out / "features.json").read_text())}


def latent_rows(dom: str) -> list[int]:
    return [int(m) for m in re.findall(r'<tr data-latent="(\d+)"', dom)]


def test_the_index_script_lists_every_latent_sorted_as_asked(pages, tmp_path):
    latents = pages["doc"]["latents"]
    index = (pages["out"] / "index.html").as_uri()
    assert latent_rows(dump_dom(index, tmp_path)) == list(range(F))
    by_max = sorted(latents, key=lambda lat: (-lat["max_activation"], lat["id"]))
    assert latent_rows(dump_dom(index + "#sort=-max", tmp_path)) == [lat["id"] for lat in by_max]
    by_flag = sorted(latents, key=lambda lat: (-lat["sink"]["dominates"], lat["id"]))
    dom = dump_dom(index + "#sort=-flag", tmp_path)
    assert latent_rows(dom) == [lat["id"] for lat in by_flag]
    assert any(lat["sink"]["dominates"] for lat in latents)
    assert 'class="sorted-desc" data-key="flag"' in dom or 'data-key="flag" class="sorted-desc"' in dom
    by_freq = sorted(latents, key=lambda lat: (lat["frequency"], lat["id"]))
    assert latent_rows(dump_dom(index + "#sort=freq", tmp_path)) == [lat["id"] for lat in by_freq]
    assert f"showing {F} of {F} matching latents" in dom
    screenshot(index + "#sort=-max", tmp_path, "index.png")


def test_the_search_box_filters_by_example_token(pages, tmp_path):
    latents = pages["doc"]["latents"]
    word = latents[0]["examples"][0]["token"].strip()
    matching = [lat["id"] for lat in latents
                if word.lower() in " | ".join(ex["token"] for ex in lat["examples"][:3]).lower()]
    dom = dump_dom((pages["out"] / "index.html").as_uri() + f"#q={word}", tmp_path)
    assert latent_rows(dom) == matching and 0 < len(matching) < F
    assert f'value="{word}"' in dom or f"showing {len(matching)} of {len(matching)} matching" in dom


def test_a_latent_page_highlights_its_example_tokens(pages, tmp_path):
    lat = max(pages["doc"]["latents"], key=lambda lat: len(lat["examples"]))
    url = (pages["out"] / "latents" / f"{lat['id']}.html").as_uri()
    dom = dump_dom(url, tmp_path)
    assert f"<h1>Latent {lat['id']}</h1>" in dom
    marked = re.findall(r'<mark class="hit"[^>]*>(.*?)</mark>', dom)
    shown = [html.escape(ex["token"], quote=False).replace("\n", "\u21b5") for ex in lat["examples"]]
    assert marked == shown and len(marked) == 8
    items = re.findall(r'<li data-sequence="(\d+)" data-position="(\d+)"', dom)
    assert [(int(s), int(p)) for s, p in items] == [(ex["sequence"], ex["position"]) for ex in lat["examples"]]
    assert "<svg" in dom and "<rect" in dom  # the histogram drew
    screenshot(url, tmp_path, "latent.png")


def test_the_pages_name_nothing_outside_their_folder(pages):
    for page in pages["out"].rglob("*.html"):
        text = page.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I), page
        assert not re.search(r"url\(|@import|<link|<iframe|<img", text, re.I), page
