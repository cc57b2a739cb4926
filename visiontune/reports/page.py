"""The frame of a report page: inline CSS, the table-sorting script, tables and images as HTML strings.

Every page is one file that needs no network: no external style sheet, script, font or image. Text from files
(class names, paths, config) is always escaped here.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["data_uri", "esc", "fmt", "img", "page", "table"]

CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dee7; --bg: #f6f7fa; --card: #fff; --accent: #2f6fd0;
        --good: #1d7f45; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { background: #1f2b45; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header .sub { color: #c5cde0; font-size: 13px; word-break: break-all; }
main { max-width: 1180px; margin: 0 auto; padding: 18px 28px 40px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px;
          margin: 0 0 18px; }
h2 { font-size: 16px; margin: 0 0 10px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { flex: 1 1 160px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; background: #fbfcfe; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 24px; font-weight: 600; }
.card .d { font-size: 12px; color: var(--muted); }
.up { color: var(--good); } .down { color: var(--bad); }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
th.sortable { cursor: pointer; user-select: none; white-space: nowrap; }
th.sortable::after { content: " \\2195"; color: #9aa3b5; }
th[aria-sort="ascending"]::after { content: " \\2191"; color: var(--accent); }
th[aria-sort="descending"]::after { content: " \\2193"; color: var(--accent); }
tbody tr:hover { background: #f0f4fb; }
.grid2 { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 18px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } }
img.plot { max-width: 100%; height: auto; display: block; margin: 0 auto; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.gallery figure { margin: 0; width: 118px; border: 1px solid var(--line); border-radius: 6px; padding: 6px;
                  background: #fbfcfe; text-align: center; }
.gallery img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; background: #eee; }
.gallery figcaption { font-size: 11px; line-height: 1.3; word-break: break-word; }
.gallery .t { color: var(--good); font-weight: 600; } .gallery .p { color: var(--bad); font-weight: 600; }
pre { background: #f3f5f9; border: 1px solid var(--line); border-radius: 6px; padding: 10px; overflow: auto;
      max-height: 520px; font-size: 12px; }
.muted { color: var(--muted); }
.bar { display: inline-block; height: 8px; background: var(--accent); border-radius: 4px; vertical-align: middle; }
"""

# Sorts a table by the clicked column header (numbers numerically, text alphabetically; click again to reverse).
# A page-side error trap marks the <body> (data-js-error) so a headless browser's dumped DOM shows script errors.
JS = """
window.addEventListener('error', function (e) {
  document.body.setAttribute('data-js-error', String(e.message || e));
});
function vtSortKey(cell) {
  var raw = cell.getAttribute('data-v');
  var text = raw === null ? cell.textContent.trim() : raw;
  var num = parseFloat(text);
  return (text !== '' && !isNaN(num) && isFinite(text)) ? {n: num} : {s: text.toLowerCase()};
}
function vtSort(th) {
  var table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
  var asc = th.getAttribute('aria-sort') !== 'ascending';
  Array.prototype.forEach.call(th.parentNode.cells, function (c) { c.removeAttribute('aria-sort'); });
  th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = vtSortKey(a.cells[col]), y = vtSortKey(b.cells[col]), r;
    if ('n' in x && 'n' in y) { r = x.n - y.n; }
    else if ('n' in x) { r = -1; } else if ('n' in y) { r = 1; }
    else { r = x.s < y.s ? -1 : (x.s > y.s ? 1 : 0); }
    return asc ? r : -r;
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
document.addEventListener('DOMContentLoaded', function () {
  document.querySelectorAll('th.sortable').forEach(function (th) {
    th.addEventListener('click', function () { vtSort(th); });
  });
  document.body.setAttribute('data-sortable-ready', String(document.querySelectorAll('th.sortable').length));
});
"""


def esc(value: Any) -> str:
    """``value`` as HTML-escaped text (quotes included)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell: floats rounded to ``digits``, ints with thousands separators, ``None`` as —."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "—" if value != value else f"{value:.{digits}f}"
    return str(value)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:<mime>;base64,...`` for ``data``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(data: bytes, alt: str, cls: str = "plot", mime: str = "image/png") -> str:
    """An ``<img>`` holding ``data`` as a data URI."""
    return f'<img class="{esc(cls)}" alt="{esc(alt)}" src="{data_uri(data, mime)}">'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = (),
          sortable: bool = True, table_id: Optional[str] = None, raw: Sequence[int] = ()) -> str:
    """A ``<table>``; ``numeric`` columns are right-aligned and sort by number (a cell may be a ``(shown, sort
    value)`` pair); ``raw`` columns hold HTML already escaped; every other cell is escaped here."""
    def th_class(i: int) -> str:
        names = (["n"] if i in numeric else []) + (["sortable"] if sortable else [])
        return f' class="{" ".join(names)}"' if names else ""

    head = "".join(f"<th{th_class(i)}>{esc(h)}</th>" for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            shown, key = cell if isinstance(cell, tuple) else (cell, None)
            text = str(shown) if i in raw else esc(fmt(shown))
            attr = (' class="n"' if i in numeric else "") + (f' data-v="{esc(key)}"' if key is not None else "")
            cells.append(f"<td{attr}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """The whole HTML document: header, the ``sections`` (HTML strings), inline CSS and script."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n<script>{JS}</script>\n</head>\n<body>\n"
        f"<header><h1>{esc(title)}</h1><div class=\"sub\">{esc(subtitle)}</div></header>\n<main>\n"
        + "\n".join(sections) + "\n</main>\n</body>\n</html>\n"
    )
