"""Blocks -> one self-contained HTML page: inline CSS (screen and print), figures embedded as base64 data URIs,
no external script, font, stylesheet or image. Every piece of text goes through `html.escape`, so labels,
hyper-parameters and error messages that come from configs or plugins are shown, never interpreted.

With plotly installed (`learnbench[interactive]`), a figure that carries an interactive plot (learning curves, cost
vs accuracy, robustness) is drawn by plotly.js, which is inlined once, before the first of them; its SVG stays in a
<noscript> for viewers without JavaScript. Without plotly, every figure is its SVG and one line says so.
"""

from __future__ import annotations

import base64
import html

from . import interactive
from .document import Block, Cell, Figure, Heading, Items, Strong, Table, Text, unique_anchors

MIME = {".svg": "image/svg+xml", ".png": "image/png"}

CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1b1f24;
       max-width: 1100px; margin: 2rem auto; padding: 0 1.2rem; line-height: 1.45; font-size: 15px; }
h1 { font-size: 1.7rem; border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.35rem; margin-top: 2.4rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
h3 { font-size: 1.1rem; margin-top: 1.8rem; }
h4 { font-size: 1rem; margin-top: 1.2rem; color: #424a53; }
h5 { font-size: .95rem; margin-top: 1rem; color: #424a53; }
table { border-collapse: collapse; margin: .6rem 0 .3rem; font-size: 13px; font-variant-numeric: tabular-nums;
        display: block; max-width: 100%; overflow-x: auto; }  /* a wide table scrolls, not the page */
th, td { border: 1px solid #d0d7de; padding: .25rem .55rem; }
th { background: #f3f5f7; text-align: center; }
td.num { text-align: right; white-space: nowrap; }
td.txt { text-align: left; }
td strong { color: #0a5d1f; }
tr:nth-child(even) td { background: #fafbfc; }
.caption, .note { color: #57606a; font-size: 13px; margin: .2rem 0 1rem; }
.note { font-style: italic; }
figure { margin: 1rem 0 1.4rem; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 13px; margin-top: .3rem; }
figure.interactive { border: 1px solid #eaeef2; }
figure.interactive figcaption { padding: 0 .4rem .3rem; }
ul.errors li { margin: .2rem 0; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px;
       background: #f3f5f7; padding: .05rem .3rem; border-radius: 3px; word-break: break-word; }
nav.toc { background: #f6f8fa; border: 1px solid #d0d7de; padding: .5rem 1rem; font-size: 14px; }
nav.toc ul { margin: .2rem 0; padding-left: 1.2rem; }
nav.toc a { color: #0b57d0; text-decoration: none; }
@media print {
  body { max-width: none; margin: 0; font-size: 11pt; }
  nav.toc { display: none; }
  h2 { page-break-before: auto; page-break-after: avoid; }
  h3, h4, h5 { page-break-after: avoid; }
  figure, table { page-break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
}
@page { margin: 1.5cm; }
"""


def to_html(blocks: list[Block], title: str) -> str:
    unique_anchors(blocks)
    plots = _Plots(interactive.available())
    body = [_block(b, plots) for b in blocks]
    first_h1 = next((i for i, b in enumerate(blocks) if isinstance(b, Heading) and b.level == 1), -1)
    body.insert(first_h1 + 1, _toc(blocks) + _figures_note(blocks, plots.live))  # contents under the title
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _toc(blocks: list[Block]) -> str:
    """Contents: every level-2 heading, with its level-3 headings nested under it."""
    groups: list[tuple[Heading | None, list[Heading]]] = []
    for b in blocks:
        if isinstance(b, Heading) and b.level == 2:
            groups.append((b, []))
        elif isinstance(b, Heading) and b.level == 3:
            if not groups:
                groups.append((None, []))
            groups[-1][1].append(b)
    if len(groups) < 2:
        return ""
    items = []
    for top, subs in groups:
        sub = "".join(f"<li>{_link(h)}</li>" for h in subs)
        items.append(f"<li>{_link(top) if top else ''}{f'<ul>{sub}</ul>' if sub else ''}</li>")
    return "<nav class=\"toc\"><strong>Contents</strong><ul>" + "".join(items) + "</ul></nav>"


def _link(h: Heading) -> str:
    return f"<a href=\"#{html.escape(h.anchor)}\">{html.escape(h.text)}</a>"


class _Plots:
    """Whether figures are drawn with plotly, and how many were: the first one inlines plotly.js."""

    def __init__(self, live: bool):
        self.live, self.count = live, 0


def _figures_note(blocks: list[Block], live: bool) -> str:
    if not any(isinstance(b, Figure) and b.interactive is not None for b in blocks):
        return ""
    text = ("Interactive figures (plotly): hover a point for its label, seeds and hyper-parameters; click a legend "
            "entry to hide that algorithm; drag to zoom, double-click to reset." if live else
            "Static figures: install plotly (pip install 'learnbench[interactive]') and rerun learnbench report "
            "for interactive ones.")
    return f"<p class=\"note\">{html.escape(text)}</p>"


def _block(b: Block, plots: _Plots) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level} id=\"{html.escape(b.anchor)}\">{html.escape(b.text)}</h{b.level}>"
    if isinstance(b, Text):
        cls = "note" if b.note else "text"
        return f"<p class=\"{cls}\">{html.escape(b.text)}</p>"
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Figure):
        return _plot(b, plots) if plots.live and b.interactive is not None else _figure(b)
    if isinstance(b, Items):
        cls = " class=\"errors\"" if b.code else ""
        return f"<ul{cls}>" + "".join(f"<li>{_item(i, b.code)}</li>" for i in b.items) + "</ul>"
    raise TypeError(f"unknown block {type(b).__name__}")


def _cell(cell: Cell, numeric: bool) -> str:
    cls = "num" if numeric else "txt"
    if isinstance(cell, Strong):
        return f"<td class=\"{cls}\"><strong>{html.escape(cell.text)}</strong></td>"
    return f"<td class=\"{cls}\">{html.escape(str(cell))}</td>"


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    rows = "".join("<tr>" + "".join(_cell(c, not t.is_text(i)) for i, c in enumerate(row)) + "</tr>"
                   for row in t.rows)
    caption = f"<p class=\"caption\">{html.escape(t.caption)}</p>" if t.caption else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{caption}"


def _figure(f: Figure) -> str:
    return f"<figure>{_img(f)}<figcaption>{html.escape(f.caption)}</figcaption></figure>"


def _img(f: Figure) -> str:
    mime = MIME[f.path.suffix.lower()]
    data = base64.b64encode(f.path.read_bytes()).decode("ascii")
    return f"<img alt=\"{html.escape(f.alt or f.caption)}\" src=\"data:{mime};base64,{data}\">"


def _plot(f: Figure, plots: _Plots) -> str:
    """The plotly figure, its SVG for viewers without JavaScript, and the caption."""
    plots.count += 1
    div = interactive.render(f.interactive, f"plot-{plots.count}", include_plotlyjs=plots.count == 1)
    img = _img(f)
    return (f"<figure class=\"interactive\">{div}<noscript>{img}</noscript>"
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")


def _item(item: str, code: bool) -> str:
    if not code or ": " not in item:
        return html.escape(item)
    head, tail = item.split(": ", 1)
    return f"{html.escape(head)}: <code>{html.escape(tail)}</code>"
