"""Markdown reports: headed sections with text, tables (lists of dicts) and PNG images.

Image links are written relative to the report's folder, so the report and its plots can be
moved or viewed together (GitHub, VS Code, any markdown viewer).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence


@dataclasses.dataclass
class Section:
    """One `## heading` of a report.

    Attributes:
      heading: the section title.
      text: markdown paragraphs shown under the heading.
      tables: each a list of row dicts, rendered as a markdown table.
      images: PNG paths (or `(caption, path)` pairs), linked relative to the report.
    """

    heading: str
    text: str = ""
    tables: Sequence[Sequence[Mapping[str, Any]]] = ()
    images: Sequence[str | os.PathLike | tuple[str, str | os.PathLike]] = ()


def _cell(value: Any, float_format: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else float_format.format(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
                   float_format: str = "{:.4g}") -> str:
    """A markdown table: one row per dict, columns in first-seen order (or `columns`).

    Missing cells are blank; floats use `float_format`; `|` in cells is escaped.
    """
    rows = list(rows)
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
    columns = list(columns)
    if not columns:
        raise ValueError("markdown_table: no columns (empty rows and no `columns` given)")
    lines = ["| " + " | ".join(_cell(c, float_format) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), float_format) for c in columns) + " |")
    return "\n".join(lines)


def _image_link(image, report_dir: str) -> str:
    caption, path = image if isinstance(image, tuple) else (None, image)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"report image {path} does not exist")
    relative = os.path.relpath(os.path.abspath(path), report_dir).replace(os.sep, "/")
    if caption is None:
        caption = os.path.splitext(os.path.basename(path))[0]
    return f"![{caption}]({relative})"


def write_report(path: str | os.PathLike, title: str,
                 sections: Sequence[Section | Mapping[str, Any]]) -> str:
    """Write a markdown report `# title` with one `## heading` per section; returns `path`.

    Sections may be `Section`s or dicts with the same fields. The file is written to a
    temporary name and renamed, so a reader never sees half a report.
    """
    path = os.fspath(path)
    report_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(report_dir, exist_ok=True)
    parts = [f"# {title}"]
    for section in sections:
        if isinstance(section, Mapping):
            section = Section(**section)
        parts.append(f"## {section.heading}")
        if section.text:
            parts.append(section.text.strip())
        for table in section.tables:
            if isinstance(table, Mapping) or any(not isinstance(row, Mapping) for row in table):
                raise ValueError(f"report section `{section.heading}`: `tables` must be a list "
                                 f"of tables, each a list of row dicts")
            parts.append(markdown_table(table))
        for image in section.images:
            parts.append(_image_link(image, report_dir))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n\n".join(parts) + "\n")
    os.replace(tmp, path)
    return path
