"""The report as a list of blocks (headings, text, tables, figures, lists), rendered to Markdown here and to HTML
by `html.py`, so both files always carry the same numbers. Also the number formats every table uses.

Blocks hold plain text: renderers escape it (Markdown: table pipes and inline code; HTML: `html.escape`), so a
label, hyper-parameter or error message from a config or a plugin can never inject markup.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from tabulate import tabulate


@dataclass
class Heading:
    level: int  # 1..5 (a problem's budget subsections push their sections one level down)
    text: str
    anchor: str = ""  # unique HTML id, filled in by `unique_anchors`


def unique_anchors(blocks: list) -> None:
    """Give every heading an id made from its text, suffixed -2, -3... where texts repeat."""
    seen: dict[str, int] = {}
    for b in blocks:
        if isinstance(b, Heading):
            base = "-".join("".join(c if c.isalnum() else " " for c in b.text.lower()).split()) or "section"
            seen[base] = seen.get(base, 0) + 1
            b.anchor = base if seen[base] == 1 else f"{base}-{seen[base]}"


@dataclass
class Text:
    text: str
    note: bool = False  # a small explanatory note (rendered in italics / smaller)


@dataclass
class Strong:
    """A table cell marked as the best in its column."""

    text: str


Cell = Union[str, Strong]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    align_left: int = 1  # the first `align_left` columns are text; the rest are numbers
    text_columns: tuple[int, ...] = ()  # further text columns (left-aligned) among the numbers

    def is_text(self, column: int) -> bool:
        return column < self.align_left or column in self.text_columns


@dataclass
class Figure:
    path: Path  # the file under figures/; HTML embeds its bytes
    caption: str
    alt: str = ""
    interactive: Any = None  # an interactive.LinesPlot/ParetoPlot of the same data: report.html draws it with plotly


@dataclass
class Items:
    """A bulleted list; `code=True` renders each item's text after the first ': ' as code (error messages)."""

    items: list[str] = field(default_factory=list)
    code: bool = False


Block = Union[Heading, Text, Table, Figure, Items]


# --- number formats ------------------------------------------------------------------------------------------
def pct(x: float | None, digits: int = 2) -> str:
    """Accuracy in percent: 0.98123 -> '98.12'; missing -> '–'."""
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def ci(lo: float, hi: float) -> str:
    return "–" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{pct(lo)}, {pct(hi)}]"


def si(x: float | None, digits: int = 3) -> str:
    """Compact engineering notation: 1.23e12 -> '1.23T', 48000 -> '48k', 9.996e11 -> '1T'; missing -> '–'."""
    if x is None or not math.isfinite(x):
        return "–"
    scales = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))
    for i, (scale, suffix) in enumerate(scales):
        if abs(x) >= scale or scale == 1.0:
            text = f"{x / scale:.{digits}g}"
            if abs(float(text)) >= 1000 and i > 0:  # rounding reached the next prefix (999.6G -> 1T)
                scale, suffix = scales[i - 1]
                text = f"{x / scale:.{digits}g}"
            return text + suffix
    return f"{x:.{digits}g}"


def secs(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def pval(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def mark_best(rows: list[list[Cell]], column: int, values: list[float], higher: bool,
              eligible: list[bool] | None = None) -> None:
    """Wrap the best finite value of a column in Strong (every tie is marked). Only rows with `eligible` true take
    part (default: every row): unranked trials are shown, never marked."""
    if eligible is not None:
        values = [v if ok else math.nan for v, ok in zip(values, eligible)]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2 or min(finite) == max(finite):
        return  # nothing to single out when every value is the same
    best = max(finite) if higher else min(finite)
    for row, v in zip(rows, values):
        if v is not None and math.isfinite(v) and v == best:
            row[column] = Strong(str(row[column]))


# --- Markdown ------------------------------------------------------------------------------------------------
def md_text(text: str) -> str:
    """Plain text into Markdown prose: characters that would start markup are backslash-escaped."""
    out = []
    for ch in text:
        out.append("\\" + ch if ch in "\\`*_<>|" else ch)
    return "".join(out)


def _md_code(text: str) -> str:
    """Inline code span that survives any backticks in text (CommonMark: a longer fence)."""
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_cell(cell: Cell) -> str:
    if isinstance(cell, Strong):
        return f"**{md_text(cell.text)}**"
    return md_text(str(cell))


def md_table(table: Table) -> str:
    rows = [[_md_cell(c) for c in row] for row in table.rows]
    headers = [md_text(h) for h in table.headers]
    align = ["left" if table.is_text(i) else "right" for i in range(len(headers))]
    return tabulate(rows, headers=headers, tablefmt="github", colalign=align, disable_numparse=True)


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append("#" * b.level + " " + md_text(b.text))
        elif isinstance(b, Text):
            parts.append(f"*{md_text(b.text)}*" if b.note else md_text(b.text))
        elif isinstance(b, Table):
            parts.append(md_table(b) + (f"\n\n*{md_text(b.caption)}*" if b.caption else ""))
        elif isinstance(b, Figure):
            rel = f"figures/{b.path.name}"
            parts.append(f"![{md_text(b.alt or b.caption)}]({rel})\n\n*{md_text(b.caption)}*")
        elif isinstance(b, Items):
            parts.append("\n".join("- " + _md_item(i, b.code) for i in b.items))
    return "\n\n".join(parts) + "\n"


def _md_item(item: str, code: bool) -> str:
    if not code or ": " not in item:
        return md_text(item)
    head, tail = item.split(": ", 1)
    return f"{md_text(head)}: {_md_code(tail)}"
