"""Every table sparsebench prints, as plain text or GitHub markdown, through one library
(`tabulate`), so alignment, escaping and widths are the same in every command."""

from __future__ import annotations

import math
from typing import Any, Sequence

from tabulate import tabulate

FORMATS = {"text": "simple", "markdown": "pipe"}


def _cell(value: Any, markdown: bool) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ") if markdown else text


def render_table(header: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "text",
                 numeric: Sequence[bool] | None = None) -> str:
    """`rows` as a table; `numeric[i]` right-aligns column i (default: every column whose
    values all look like numbers). Values are shown as given (no reformatting of numbers)."""
    if fmt not in FORMATS:
        raise ValueError(f"table format {fmt!r}; formats: {', '.join(FORMATS)}")
    markdown = fmt == "markdown"
    body = [[_cell(v, markdown) for v in row] for row in rows]
    if numeric is None:
        numeric = [all(looks_numeric(r[i]) for r in body if r[i]) and any(r[i] for r in body)
                   for i in range(len(header))]
    align = ["right" if n else "left" for n in numeric]
    return tabulate(body, headers=[_cell(h, markdown) for h in header], tablefmt=FORMATS[fmt],
                    disable_numparse=True, colalign=align if header else None)


NUMBER_SUFFIXES = "x%*≈"


def looks_numeric(value: Any) -> bool:
    """A display value that is a number: 12,300 / 1.23 / 2.50x / 25,000* / 24,800≈ / 4.1% /
    -3.0% / 131k [128k-135k]."""
    if isinstance(value, (int, float)):
        return True
    text = str(value).strip().split(" [", 1)[0].replace(",", "").replace(".", "").lstrip("+-")
    text = text.rstrip(NUMBER_SUFFIXES).rstrip("kMG")
    return text.isdigit()


def markdown_text(text: str) -> str:
    """A line of prose as markdown shows it: a leading `*`, `-`, `+`, `#` or `>` (a noisy
    mark, a negative change) escaped so it is not read as a list, a heading or a quote."""
    return "\\" + text if text[:1] in "*-+#>" else text


def sig3(value: Any) -> str:
    """Samples/s to 3 significant digits, with thousands separators (12,300)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    value = float(value)
    if value == 0:
        return "0"
    digits = 3 - int(math.floor(math.log10(abs(value)))) - 1
    rounded = round(value, digits)
    return f"{rounded:,.{max(digits, 0)}f}"
