"""The project's reports: tables as Markdown or HTML, and self-contained HTML pages (every picture embedded,
so a page is one file that opens anywhere, offline). ``compare`` and the data-efficiency curve write them."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]


def markdown(table: Table) -> list[str]:
    lines = [
        f"## {table.title}",
        "",
        "| " + " | ".join(table.headers) + " |",
        "|---|" + "---:|" * (len(table.headers) - 1),
    ]
    return lines + ["| " + " | ".join(row) + " |" for row in table.rows] + [""]


def html_table(table: Table, heading: bool = True) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in table.rows
    )
    title = f"<h2>{html.escape(table.title)}</h2>\n" if heading else ""
    return f"{title}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def embedded_image(path: Path, alt: str) -> str:
    """An <img> carrying the picture itself, so the report is one file."""
    if not path.is_file():
        return f"<p class='missing'>{html.escape(alt)}: not produced ({html.escape(str(path))})</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return (
        f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(alt)}</figcaption></figure>"
    )


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
.row { display: flex; gap: 1em; flex-wrap: wrap; } .row figure { flex: 1 1 45%; }
pre { background: #f6f6f6; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
"""


def page(title: str, parts: list[str]) -> str:
    """One HTML page of ``parts`` (HTML fragments), styled, titled ``title``."""
    body = "\n".join(parts)
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
