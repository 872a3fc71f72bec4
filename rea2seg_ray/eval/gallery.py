"""The overlay gallery: ``<dir>/gallery/index.html``, a static page that opens from disk (no server, no network).

Per query: the image with the answer (the top-1 mask, or the union of the selected candidates) drawn as the scorer
sees a candidate (``scoring.render.overlay``, the ``dim`` style) and, when the input has ground truth, its outline in green and the top-1 IoU; the top-k candidates as
thumbnails with rank, score and source (the selected ones outlined in blue); an error row's message and stage. The page filters by category and status
and sorts by IoU (worst first) or score. Images are JPEG files under ``gallery/img/``.

Large runs are sampled (``gallery.max_queries``), stratified by (category, status): each stratum gets its share of
the sample (at least one query), and within it the queries whose hashed id is smallest, so the same run always gives
the same gallery. The predictions are streamed twice (three small columns to sample, then the sampled rows by a
``query_id`` filter): the gallery's memory does not grow with the run.
"""

from __future__ import annotations

import hashlib
import heapq
import html
import io
import json
from collections.abc import Callable

import numpy as np

from .. import get_logger, storage
from ..datasets.shards import predictions_dataset
from ..records import Prediction
from .metrics import QueryScore

log = get_logger(__name__)
GT_COLOUR = (60, 220, 75)  # ground-truth outline (green, unlike every scorer overlay)


def _hash(query_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{query_id}".encode()).digest()[:8], "big")


def allocate(counts: dict, total: int) -> dict:
    """Share ``total`` sample places among strata in proportion to their sizes (largest remainder), at least one
    each while places last, never more than a stratum holds."""
    if sum(counts.values()) <= total:
        return dict(counts)
    keys = sorted(counts, key=lambda s: (-counts[s], s))
    out = {s: 0 for s in keys}
    for s in keys[:total]:
        out[s] = 1
    left = total - sum(out.values())
    n = sum(counts.values())
    want = {s: counts[s] * total / n for s in keys}
    while left > 0:
        open_ = [s for s in keys if out[s] < counts[s]]
        if not open_:
            break
        s = max(open_, key=lambda s: (want[s] - out[s], -keys.index(s)))
        out[s] += 1
        left -= 1
    return out


def sample_ids(pred_uri: str, max_queries: int, seed: int = 0) -> tuple[list[str], int]:
    """(the ids the gallery shows, how many rows the predictions hold): every query when the run has at most
    ``max_queries``, else a stratified sample (see the module docstring). Reads the ``query_id``, ``category`` and
    ``status`` columns only."""
    return storage.with_retries(lambda: _sample_ids(pred_uri, max_queries, seed), f"sample {pred_uri}")


def _sample_ids(pred_uri: str, max_queries: int, seed: int) -> tuple[list[str], int]:
    ds = predictions_dataset(pred_uri)
    if ds is None:
        return [], 0
    counts: dict[tuple[str, str], int] = {}
    heaps: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for b in ds.to_batches(columns=["query_id", "category", "status"]):
        for qid, cat, status in zip(*(b.column(i).to_pylist() for i in range(3)), strict=True):
            key = (cat or "", status or "")
            counts[key] = counts.get(key, 0) + 1
            h = heaps.setdefault(key, [])
            item = (-_hash(qid, seed), qid)  # a max-heap of the smallest hashes: bounded by max_queries
            if len(h) < max_queries:
                heapq.heappush(h, item)
            elif item > h[0]:
                heapq.heapreplace(h, item)
    share = allocate(counts, max_queries)
    ids = []
    for key, n in share.items():
        ids += [qid for _, qid in sorted(heaps[key], reverse=True)[:n]]
    return sorted(ids), sum(counts.values())


def read_rows(pred_uri: str, ids: list[str]) -> list[Prediction]:
    import pyarrow.compute as pc

    ds = predictions_dataset(pred_uri)
    if ds is None or not ids:
        return []
    table = storage.with_retries(
        lambda: ds.to_table(filter=pc.field("query_id").isin(ids)), f"read {pred_uri}"
    )
    seen: dict[str, Prediction] = {}
    for row in table.to_pylist():
        seen[row["query_id"]] = Prediction.from_row(row)
    return [seen[i] for i in ids if i in seen]


def _jpeg(image: np.ndarray, uri: str, quality: int = 88) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    storage.write_bytes(uri, buf.getvalue())


def _name(query_id: str) -> str:
    return hashlib.sha1(query_id.encode()).hexdigest()[:16]


def render_item(
    p: Prediction,
    out_dir: str,
    gt: np.ndarray | None,
    score: QueryScore | None,
    image_side: int,
    thumbs: int,
) -> dict:
    """Draw one query's pictures under ``<out_dir>/img/`` and return its entry of the page's data."""
    from ..images import decode, fetch
    from ..scoring.render import fit_array, fit_mask, outline, overlay, resize_once

    item = {
        "id": p.query_id, "question": p.question, "category": p.category or "", "status": p.status,
        "error": p.error, "error_stage": p.error_stage, "score": None if p.score is None else round(float(p.score), 6),
        "iou": None if score is None else round(score.iou("top1"), 6), "image": None, "candidates": [],
        "size": [p.width, p.height], "selected": list(p.selected),
    }  # fmt: skip
    if not p.image_uri:
        item["image_error"] = "the row names no image"
        return item
    if p.status != "ok" and p.error_stage in ("read", "decode"):
        # The job could not read or decode this image: its error says why; trying again (with every retry) would
        # only slow the page down.
        item["image_error"] = "not shown: the job could not read it (see the error)"
        return item
    try:
        raw = fetch(p.image_uri)
        image, _ = decode(raw, p.image_uri, max_side=image_side)
    except Exception as e:  # noqa: BLE001 - the page says why the picture is missing, the row stays
        item["image_error"] = str(e)
        return item
    name = _name(p.query_id)
    base = resize_once(image, image_side)
    dimmed = (base * 0.45).astype(np.uint8)
    if p.mask is not None:
        main = overlay(base, fit_mask(p.mask, base.shape[:2]), "dim", dimmed)
    else:
        main = base.copy()
    if gt is not None:
        main[outline(fit_array(gt == 1, base.shape[:2]), 1)] = GT_COLOUR
    item["image"] = f"img/{name}.jpg"
    _jpeg(main, storage.join(out_dir, item["image"]))
    thumb_base = resize_once(image, 160)
    thumb_dim = (thumb_base * 0.45).astype(np.uint8)
    ranked = sorted(p.candidates, key=lambda c: c.rank)[:thumbs]
    for c in ranked:
        path = f"img/{name}-c{c.rank}.jpg"
        _jpeg(
            overlay(thumb_base, fit_mask(c.mask, thumb_base.shape[:2]), "dim", thumb_dim),
            storage.join(out_dir, path),
        )
        entry = {"rank": c.rank, "score": round(float(c.score), 6), "source": c.source, "thumb": path}
        if score is not None and c.rank < len(score.candidate_ious):
            entry["iou"] = round(score.candidate_ious[c.rank], 6)
        item["candidates"].append(entry)
    return item


def build_gallery(
    pred_uri: str,
    output: str,
    max_queries: int = 200,
    thumbs: int = 5,
    image_side: int = 640,
    seed: int = 0,
    scores: dict[str, QueryScore] | None = None,
    ground_truth: Callable[[set[str]], dict[str, np.ndarray]] | None = None,
    plots: list[str] | None = None,
    title: str = "Rea2Seg",
) -> str:
    """Write ``<output>/gallery/index.html`` and its images; returns the page's URI.

    ``scores``: per-query evaluation (IoU shown, the same values as ``per_query.jsonl``); ``ground_truth(ids)``:
    {query_id: (H, W) uint8 {0, 1, 255}} for the sampled ids (outlined in green); ``plots``: image paths relative to
    the gallery folder, shown above the queries."""
    out_dir = storage.join(output, "gallery")
    ids, total = sample_ids(pred_uri, max_queries, seed)
    rows = read_rows(pred_uri, ids)
    gts = ground_truth(set(ids)) if ground_truth and ids else {}
    items = []
    for p in rows:
        s = scores.get(p.query_id) if scores else None
        items.append(render_item(p, out_dir, gts.get(p.query_id), s, image_side, thumbs))
    page = render_page(items, title=title, plots=plots or [], has_iou=scores is not None, sampled_of=total)
    uri = storage.join(out_dir, "index.html")
    storage.write_bytes(uri, page.encode())
    log.info("gallery: %s (%d queries)", uri, len(items))
    return uri


PAGE_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:8px 16px;z-index:1}
header h1{font-size:18px;margin:0 0 4px}header label{margin-right:14px}
#plots{display:flex;flex-wrap:wrap;gap:8px;padding:8px 16px}#plots img{height:180px;background:#fff}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:12px;padding:12px 16px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.card.error{border-color:#e6194b}.card img.main{width:100%;display:block}
.q{font-weight:600;margin:6px 0 2px}.meta{color:#555;font-size:12px}.err{color:#b00;font-size:12px}
.thumbs{display:flex;flex-wrap:wrap;gap:4px;margin-top:6px}.thumbs figure{margin:0;font-size:11px;color:#444}
.thumbs img{height:72px;display:block}.thumbs figure.sel img{outline:3px solid #0082c8}
"""

PAGE_JS = """
const data = JSON.parse(document.getElementById('data').textContent);
const el = (tag, attrs, text) => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text; return e; };
const fmt = v => (v === null || v === undefined) ? '-' : v.toFixed(3);
for (const [id, key] of [['cat', 'category'], ['status', 'status']]) {
  const sel = document.getElementById(id);
  for (const v of [...new Set(data.items.map(i => i[key]))].sort()) sel.appendChild(el('option', {value: v}, v || '(none)'));
}
function show() {
  const cat = document.getElementById('cat').value, st = document.getElementById('status').value;
  const by = document.getElementById('sort').value;
  let items = data.items.filter(i => (cat === '*' || i.category === cat) && (st === '*' || i.status === st));
  const key = i => by === 'iou' ? (i.iou === null ? -1 : i.iou) : by === 'score' ? -(i.score === null ? -1e9 : i.score) : 0;
  items.sort((a, b) => key(a) - key(b) || (a.id < b.id ? -1 : 1));
  const grid = document.getElementById('grid'); grid.replaceChildren();
  for (const i of items) {
    const card = el('div', {class: 'card' + (i.status === 'ok' ? '' : ' error'), 'data-id': i.id});
    if (i.image) card.appendChild(el('img', {class: 'main', src: i.image, alt: i.id, loading: 'lazy'}));
    card.appendChild(el('div', {class: 'q'}, i.question));
    card.appendChild(el('div', {class: 'meta'}, `${i.id} · ${i.category || '-'} · ${i.status} · score ${fmt(i.score)}` + (data.has_iou ? ` · IoU ${fmt(i.iou)}` : '')));
    if (i.error) card.appendChild(el('div', {class: 'err'}, `${i.error_stage}: ${i.error}`));
    if (i.image_error) card.appendChild(el('div', {class: 'err'}, `image: ${i.image_error}`));
    const th = el('div', {class: 'thumbs'});
    for (const c of i.candidates) { const f = el('figure', {class: (i.selected || []).includes(c.rank) ? 'sel' : ''}); f.appendChild(el('img', {src: c.thumb, alt: `rank ${c.rank}`, loading: 'lazy'}));
      f.appendChild(el('figcaption', {}, `#${c.rank + 1} ${fmt(c.score)} ${c.source}` + (c.iou !== undefined ? ` IoU ${fmt(c.iou)}` : ''))); th.appendChild(f); }
    card.appendChild(th); grid.appendChild(card);
  }
  document.getElementById('count').textContent = `${items.length} of ${data.items.length} shown`;
}
for (const id of ['cat', 'status', 'sort']) document.getElementById(id).addEventListener('change', show);
show();
"""


def render_page(items: list[dict], title: str, plots: list[str], has_iou: bool, sampled_of: int = 0) -> str:
    """The self-contained page: CSS, the data (JSON in a script tag) and the script that lays it out.
    ``sampled_of``: the run's number of queries when the page shows a sample of them."""
    data = json.dumps({"items": items, "has_iou": has_iou}).replace("</", "<\\/")
    plot_tags = "".join(f'<img src="{html.escape(p)}" alt="{html.escape(p)}">' for p in plots)
    sample_note = f" (a stratified sample of {sampled_of})" if sampled_of > len(items) else ""
    sort_default = '<option value="iou">IoU (worst first)</option>' if has_iou else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} gallery</title>
<style>{PAGE_CSS}</style></head>
<body><header><h1>{html.escape(title)}: {len(items)} queries{sample_note}</h1>
<label>category <select id="cat"><option value="*">all</option></select></label>
<label>status <select id="status"><option value="*">all</option></select></label>
<label>sort <select id="sort">{sort_default}<option value="score">score (best first)</option>
<option value="id">query id</option></select></label><span id="count"></span></header>
<section id="plots">{plot_tags}</section>
<main id="grid"></main>
<script type="application/json" id="data">{data}</script>
<script>{PAGE_JS}</script>
</body></html>
"""
