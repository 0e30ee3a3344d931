"""The report as one self-contained HTML page: inline CSS, figures as base64 PNG data URIs, no
scripts and nothing fetched, so it opens offline and can be mailed or attached as one file."""
from __future__ import annotations

import base64
from html import escape

from launch.report.tables import Table

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1240px; padding: 0 16px; color: #222; background: #fff; }
h1 { font-size: 24px; margin-bottom: 4px; }
h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.meta, p.caption, p.note { color: #555; font-size: 14px; }
p.note { font-style: italic; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; }
code { background: #f3f3f3; padding: 0 3px; }
"""


def _is_number(text: str) -> bool:
    cleaned = text.replace("×", "").replace("%", "").replace(" s", "").replace("/", "").strip()
    return cleaned.replace(".", "", 1).replace("-", "", 1).isdigit()


def html_table(table: Table, css_class: str) -> str:
    headers, rows = table
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{escape(c)}</td>' if _is_number(c) else f"<td>{escape(c)}</td>"
                                    for c in row) + "</tr>\n" for row in rows)
    return f'<table class="{css_class}">\n<tr>{head}</tr>\n{body}</table>\n'


def image(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">\n'


def page(title: str, meta: str, blocks: list[tuple[str, str, str]]) -> str:
    """blocks: (section title, caption, HTML body)."""
    parts = [f"<h1>{escape(title)}</h1>\n<p class=\"meta\">{meta}</p>\n"]
    for heading, caption, body in blocks:
        parts.append(f"<h2>{escape(heading)}</h2>\n")
        if caption:
            parts.append(f'<p class="caption">{escape(caption)}</p>\n')
        parts.append(body)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "".join(parts) + "</body>\n</html>\n")


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>\n'
