"""The HTML page: one self-contained file with inline CSS; images by relative path."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

from swav.report.runfiles import ResultTable, format_value

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111827;
       background: #f3f4f6; margin: 0; }
main { max-width: 1080px; margin: 0 auto; padding: 24px; }
h1 { font-size: 26px; margin: 8px 0 2px; }
h2 { font-size: 19px; margin: 0 0 12px; }
.sub { color: #6b7280; margin: 0 0 18px; word-break: break-all; }
section { background: white; border-radius: 10px; padding: 18px 22px; margin: 0 0 18px;
          box-shadow: 0 1px 3px rgba(0,0,0,.08); }
img { max-width: 100%; height: auto; display: block; margin: 6px 0; }
table { border-collapse: collapse; margin: 6px 0 10px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 14px 5px 0; text-align: left; border-bottom: 1px solid #e5e7eb; }
th { color: #374151; font-weight: 600; }
td.num { text-align: right; }
.facts td:first-child { color: #6b7280; padding-right: 24px; }
.caption { color: #374151; font-size: 14px; margin: 2px 0 14px; }
.note { background: #fef3c7; border-left: 4px solid #f59e0b; padding: 8px 12px; margin: 8px 0;
        border-radius: 4px; }
.file { font-family: ui-monospace, Menlo, monospace; font-size: 14px; color: #1f2937; margin: 12px 0 0; }
.details { color: #6b7280; font-size: 13px; }
footer { color: #9ca3af; font-size: 12px; text-align: center; padding: 8px; }
"""


@dataclass
class Section:
    title: str
    parts: list[str] = field(default_factory=list)

    def image(self, src: str, alt: str, caption: str | None = None) -> None:
        self.parts.append(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">')
        if caption:
            self.parts.append(f'<p class="caption">{html.escape(caption)}</p>')

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{html.escape(text)}</p>')

    def text(self, text: str) -> None:
        self.parts.append(f'<p class="caption">{html.escape(text)}</p>')

    def facts(self, items: Sequence[tuple[str, str]]) -> None:
        body = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in items
        )
        self.parts.append(f'<table class="facts">{body}</table>')

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table of already formatted cells: the first column names the row, the rest are numbers."""
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            f"<tr><th>{html.escape(name)}</th>"
            + "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells)
            + "</tr>"
            for name, *cells in rows
        )
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def results(self, table: ResultTable) -> None:
        self.parts.append(f'<p class="file">{html.escape(table.file)}</p>')
        if table.error:
            self.parts.append(f'<p class="details">{html.escape(table.error)}</p>')
        if table.rows:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in ["", *table.columns])
            body = ""
            for name, values in table.rows:
                cells = "".join(
                    f'<td class="num">{html.escape(format_value(values[c])) if c in values else "&ndash;"}</td>'
                    for c in table.columns
                )
                body += f"<tr><th>{html.escape(name)}</th>{cells}</tr>"
            self.parts.append(f"<table><tr>{head}</tr>{body}</table>")
        if table.details:
            text = ", ".join(f"{k} = {v}" for k, v in table.details)
            self.parts.append(f'<p class="details">{html.escape(text)}</p>')

    def render(self) -> str:
        return f"<section><h2>{html.escape(self.title)}</h2>{''.join(self.parts)}</section>"


def render_page(title: str, subtitle: str, sections: Sequence[Section], footer: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
        f'<body><main><h1>{html.escape(title)}</h1><p class="sub">{html.escape(subtitle)}</p>\n'
        + "\n".join(s.render() for s in sections)
        + f"\n<footer>{html.escape(footer)}</footer></main></body></html>\n"
    )
