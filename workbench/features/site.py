"""The static site of one SAE's features: index.html and latents/<i>.html, from features.json's content.

Every page is one self-contained file (inline CSS; the index's script inline too) that opens from disk
(file://) with no server and no network: it loads nothing, links nothing outside the folder.

index.html: a table of every latent (id, frequency, mean and max activation, sink firings and maximum,
the sink flag, its top tokens), built by the inline script from the data embedded in the page; click a
column header to sort by it (again: the other way), type in the search box to filter by latent id or
example token. The state is kept in the URL's fragment (`index.html#sort=-max&q=the`), so a sorted or
filtered view can be bookmarked. At most ROWS_SHOWN rows are drawn at a time (search or sort to reach
the rest): a 65k-latent SAE stays responsive.

latents/<i>.html: static HTML, no script: the latent's figures, its sink report (with a warning when its
sink maximum dominates), the activation histogram (inline SVG), its top examples with their contexts
(the example token highlighted, its background intensity the activation over the latent's maximum), and
its output-token effects when features.json has them.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from workbench.files import make_dir, write_text

ROWS_SHOWN = 2000
TOP_TOKENS = 3  # example tokens shown in the index per latent

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; }
th { cursor: pointer; background: #f4f4f4; user-select: none; } th.sorted-asc::after { content: " \\25B2"; }
th.sorted-desc::after { content: " \\25BC"; } td.tokens, th.tokens { text-align: left; }
.flag { color: #b00; font-weight: bold; } .muted { color: #888; }
.warn { background: #fee; border: 1px solid #d99; padding: 0.5em; margin: 1em 0; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.tok { border-radius: 2px; } mark.hit { color: #000; border: 1px solid #c60; border-radius: 2px; padding: 0 1px; }
ol.examples li { margin: 0.3em 0; } .act { display: inline-block; min-width: 6em; color: #555; }
.bar { fill: #4a7ab5; } nav a { margin-right: 1em; } input#q { width: 24em; margin: 0.5em 0; }
"""

INDEX_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById("latent-data").textContent);
  var cols = data.columns, rows = data.rows, limit = data.limit;
  var at = {}; cols.forEach(function (c, i) { at[c] = i; });
  var state = {key: "id", desc: false, q: ""};
  function readHash() {
    var p = new URLSearchParams(location.hash.slice(1)), s = p.get("sort");
    if (s) { state.desc = s.charAt(0) === "-"; state.key = s.replace(/^-/, ""); }
    if (at[state.key] === undefined) { state.key = "id"; state.desc = false; }
    state.q = p.get("q") || "";
    document.getElementById("q").value = state.q;
  }
  function writeHash() {
    var h = "sort=" + (state.desc ? "-" : "") + state.key + (state.q ? "&q=" + encodeURIComponent(state.q) : "");
    history.replaceState(null, "", "#" + h);
  }
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; }); }
  function num(v, d) { return v === null ? "-" : Number(v).toPrecision(d); }
  function render() {
    var q = state.q.trim().toLowerCase(), k = at[state.key], sign = state.desc ? -1 : 1;
    var shown = rows.filter(function (r) {
      return !q || String(r[at.id]) === q || r[at.tokens].toLowerCase().indexOf(q) >= 0;
    });
    shown.sort(function (a, b) { return a[k] < b[k] ? -sign : a[k] > b[k] ? sign : a[at.id] - b[at.id]; });
    var html = shown.slice(0, limit).map(function (r) {
      var id = r[at.id];
      return '<tr data-latent="' + id + '"><td><a href="latents/' + id + '.html">' + id + "</a></td>" +
        "<td>" + num(r[at.freq], 3) + "</td><td>" + num(r[at.mean], 3) + "</td><td>" + num(r[at.max], 4) + "</td>" +
        "<td>" + r[at.sink_fires] + "</td><td>" + num(r[at.sink_max], 4) + "</td>" +
        '<td class="flag">' + (r[at.flag] ? "sink" : "") + '</td><td class="tokens">' + esc(r[at.tokens]) + "</td></tr>";
    }).join("");
    document.querySelector("#latents tbody").innerHTML = html;
    document.querySelectorAll("#latents th").forEach(function (th) {
      th.className = th.getAttribute("data-key") === state.key ? (state.desc ? "sorted-desc" : "sorted-asc") : "";
      if (th.getAttribute("data-key") === "tokens") { th.className += " tokens"; }
    });
    document.getElementById("shown").textContent = "showing " + Math.min(limit, shown.length) + " of " +
      shown.length + " matching latents (" + rows.length + " in all)";
  }
  document.querySelectorAll("#latents th").forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      if (key === state.key) { state.desc = !state.desc; } else { state.key = key; state.desc = key !== "id" && key !== "tokens"; }
      writeHash(); render();
    });
  });
  document.getElementById("q").addEventListener("input", function (e) { state.q = e.target.value; writeHash(); render(); });
  window.addEventListener("hashchange", function () { readHash(); render(); });
  readHash(); render();
})();
"""

COLUMNS = [("id", "latent"), ("freq", "frequency"), ("mean", "mean act."), ("max", "max act."),
           ("sink_fires", "sink fires"), ("sink_max", "sink max"), ("flag", "sink flag"), ("tokens", "top tokens")]


def sae_files(width: int) -> list[str]:
    """The files one SAE's output holds, relative to its folder (features.json included)."""
    return ["features.json", "index.html", *(f"latents/{i}.html" for i in range(width))]


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def shown(text: str) -> str:
    """A token's text for display: escaped, a newline as a visible mark (the context stays on one line)."""
    return html.escape(text).replace("\n", "\u21b5").replace("\r", "\u240d").replace("\t", "\u21e5")


def script_json(data: object) -> str:
    """JSON safe inside <script>: no "</" can end the element early."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def write_sae_site(folder: Path, doc: dict, resume: str) -> None:
    """index.html and latents/<i>.html of one SAE into `folder`, from its features.json content `doc`."""
    write_text(folder / "index.html", index_page(doc), resume)
    latents = make_dir(folder / "latents", resume)
    for latent in doc["latents"]:
        # Not fsync'd (two fsyncs a page cost 8 ms here, 9 minutes for a 65k-latent SAE): a re-run
        # rebuilds the pages; features.json and the indexes are durable.
        write_text(latents / f"{latent['id']}.html", latent_page(doc, latent), resume, durable=False)


def _summary(doc: dict) -> str:
    sae, cache = doc["sae"], doc["cache"]
    flagged = sum(lat["sink"]["dominates"] for lat in doc["latents"])
    dead = sum(lat["fires"] == 0 for lat in doc["latents"])
    multiple = "off" if cache["sink_multiple"] is None else f"{cache['sink_multiple']:g}x the batch median"
    return (f"<p>{html.escape(sae['folder'])}: {html.escape(sae['kind'])}, {sae['width']} latents on layer {sae['layer']} "
            f"of {html.escape(cache['model'])}. Encode: {html.escape(sae['encode'])}.</p>"
            f"<p>{cache['kept_tokens']:,} kept tokens (examples come only from these) and {cache['sink_tokens']:,} sink "
            f"tokens (sink filter: {multiple}, {cache['filter_source']}) from {html.escape(cache['path'])}; "
            f"{dead} latents never fire on a kept token; <span class=\"flag\">{flagged}</span> are flagged: their "
            "maximum on sinks exceeds their maximum on kept tokens.</p>")


def index_page(doc: dict) -> str:
    rows = []
    for lat in doc["latents"]:
        tokens = " | ".join(ex["token"] for ex in lat["examples"][:TOP_TOKENS])
        rows.append([lat["id"], lat["frequency"], lat["mean_activation"], lat["max_activation"], lat["sink"]["fires"],
                     lat["sink"]["max_activation"], int(lat["sink"]["dominates"]), tokens])
    data = {"columns": [key for key, _ in COLUMNS], "rows": rows, "limit": ROWS_SHOWN}
    head = "".join(f'<th data-key="{key}">{label}</th>' for key, label in COLUMNS)
    body = (f"<h1>Latents of {html.escape(Path(doc['sae']['folder']).name)} (layer {doc['sae']['layer']})</h1>\n"
            f"{_summary(doc)}\n"
            '<input id="q" type="search" placeholder="search: a latent id or an example token" autocomplete="off">\n'
            '<p id="shown" class="muted"></p>\n'
            f'<table id="latents"><thead><tr>{head}</tr></thead><tbody></tbody></table>\n'
            '<noscript><p>The table needs JavaScript; every latent has its page in latents/.</p></noscript>\n'
            f'<script id="latent-data" type="application/json">{script_json(data)}</script>\n'
            f"<script>{INDEX_SCRIPT}</script>")
    return page(f"latents of {doc['sae']['folder']}", body)


def context_html(example: dict, max_activation: float) -> str:
    """The example's context, its token highlighted with an intensity of activation / the latent's max."""
    ctx = example["context"]
    alpha = 0.15 + 0.85 * (example["activation"] / max_activation if max_activation > 0 else 1.0)
    parts = []
    for j, text in enumerate(ctx["tokens"]):
        if j == ctx["index"]:
            parts.append(f'<mark class="hit" style="background: rgba(255, 140, 0, {alpha:.3f})" '
                         f'title="{example["activation"]:.4g}">{shown(text)}</mark>')
        else:
            parts.append(f'<span class="tok">{shown(text)}</span>')
    return "".join(parts)


def histogram_svg(hist: dict) -> str:
    """Bars of the activation histogram (log-spaced bins) as inline SVG; a line when it never fires."""
    counts = hist["counts"]
    if not counts:
        return '<p class="muted">never fires on a kept token</p>'
    height, bar = 120, max(2, 600 // len(counts))  # about 600 px wide
    top = max(counts)
    bars = "".join(f'<rect class="bar" x="{i * bar}" y="{height - c / top * height:.1f}" width="{bar - 1}" '
                   f'height="{c / top * height:.1f}"><title>{hist["edges"][i]:.4g} .. {hist["edges"][i + 1]:.4g}: '
                   f"{c}</title></rect>" for i, c in enumerate(counts))
    return (f'<svg width="{bar * len(counts)}" height="{height}" role="img" aria-label="activation histogram">{bars}</svg>'
            f'<p class="muted">activation {hist["edges"][0]:.4g} to {hist["edges"][-1]:.4g}, {len(counts)} bins of '
            f"a quarter octave; counts up to {top:,}</p>")


def latent_page(doc: dict, lat: dict) -> str:
    i, width = lat["id"], doc["sae"]["width"]
    sink = lat["sink"]
    nav = '<nav><a href="../index.html">all latents</a>'
    nav += f'<a href="{i - 1}.html">previous</a>' if i > 0 else ""
    nav += f'<a href="{i + 1}.html">next</a>' if i + 1 < width else ""
    nav += "</nav>"
    figures = (f"<table class=\"figures\"><tr><th>fires</th><td>{lat['fires']:,} of {doc['cache']['kept_tokens']:,} kept tokens "
               f"(frequency {fmt(lat['frequency'])})</td></tr>"
               f"<tr><th>mean activation</th><td>{fmt(lat['mean_activation'])} (when active: {fmt(lat['mean_when_active'])})</td></tr>"
               f"<tr><th>max activation</th><td>{fmt(lat['max_activation'])}</td></tr>"
               f"<tr><th>on sinks</th><td>fires on {sink['fires']:,} of {doc['cache']['sink_tokens']:,} sink tokens, "
               f"max {fmt(sink['max_activation'])}</td></tr></table>")
    warn = ""
    if sink["dominates"]:
        where = sink["max_at"]
        warn = (f'<div class="warn" id="sink-warning"><span class="flag">sink flag</span>: on the dropped sink token '
                f"{shown(repr(where['token']))} (sequence {where['sequence']}, position {where['position']}) this latent reaches "
                f"{fmt(sink['max_activation'])}, above its maximum {fmt(lat['max_activation'])} on the tokens it was "
                "trained on. Without the sink filter its top examples would be sinks.</div>")
    examples = "".join(
        f'<li data-sequence="{ex["sequence"]}" data-position="{ex["position"]}" data-activation="{ex["activation"]:.6g}">'
        f'<span class="act">{ex["activation"]:.4g}</span> <span class="ctx">{context_html(ex, lat["max_activation"])}</span>'
        f'<span class="muted"> (sequence {ex["sequence"]}, position {ex["position"]})</span></li>'
        for ex in lat["examples"])
    examples = f'<ol class="examples">{examples}</ol>' if examples else '<p class="muted">no kept token activates it</p>'
    body = (f"<h1>Latent {i}</h1>{nav}\n{figures}\n{warn}\n<h2>Activation histogram (kept tokens)</h2>\n"
            f"{histogram_svg(lat['histogram'])}\n<h2>Top activations</h2>\n{examples}\n{_effects_html(lat)}")
    return page(f"latent {i}", body)


def _effects_html(lat: dict) -> str:
    effects = lat.get("effects")
    if effects is None:
        return ""
    cols = []
    for name in ("positive", "negative"):
        rows = "".join(f"<tr><td class=\"tokens ctx\">{shown(e['token'])}</td><td>{e['logit']:+.4g}</td></tr>"
                       for e in effects[name])
        cols.append(f"<div style=\"display:inline-block; vertical-align:top; margin-right:2em\"><h3>{name}</h3>"
                    f"<table>{rows}</table></div>")
    return ("<h2>Output-token effects</h2><p class=\"muted\">the decoder direction through the unembedding, "
            f"final norm gain folded in</p>{''.join(cols)}")


def write_root_index(out: Path, root: Path, results: list) -> None:
    """out/index.html linking the pages of every SAE under `root` (FeaturesResult each)."""
    rows = "".join(
        f"<tr><td class=\"tokens\"><a href=\"{html.escape(r.out.relative_to(out).as_posix())}/index.html\">"
        f"{html.escape(str(r.folder.relative_to(root)))}</a></td><td>{r.width}</td><td>{r.dead}</td>"
        f"<td class=\"flag\">{r.flagged}</td><td>{r.kept_tokens:,}</td><td>{r.sink_tokens:,}</td></tr>" for r in results)
    body = (f"<h1>Features of the SAEs under {html.escape(str(root))}</h1>"
            "<table><thead><tr><th class=\"tokens\">SAE</th><th>latents</th><th>never fire</th><th>sink flags</th>"
            f"<th>kept tokens</th><th>sink tokens</th></tr></thead><tbody>{rows}</tbody></table>")
    write_text(out / "index.html", page(f"features of {root}", body), "re-run the same command")
