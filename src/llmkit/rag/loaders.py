"""Document loaders: files and folders -> `Document`s of text parts with page numbers and metadata.

Supported: `.txt .md .rst .html/.htm` (text extracted, boilerplate dropped), `.pdf` (pypdf, one part
per page), `.jsonl` (one part per record: a text field plus the other fields as metadata). Headings are
normalised to Markdown `#` lines so the chunker sees one structure for every format.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from llmkit.errors import InputError
from llmkit.text.sources import read_jsonl_records

EXTENSIONS = (".txt", ".md", ".markdown", ".rst", ".html", ".htm", ".pdf", ".jsonl")


@dataclass
class Part:
    """A stretch of a document's text: a PDF page, a JSONL record, or the whole file."""

    text: str
    page: int | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Document:
    source: str  # the path as given at indexing (joined with the relative path inside a folder)
    path: Path
    parts: list[Part]


def find_files(paths: list[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(source, path) for every supported file under `paths` (folders searched recursively), sorted."""
    out = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.suffix.lower() in EXTENSIONS and not any(s.startswith(".") for s in rel.parts) and f.is_file():
                    out.append((str(Path(given) / rel), f))
        elif p.is_file():
            if p.suffix.lower() not in EXTENSIONS:
                raise InputError(f"{given}: unsupported file type {p.suffix!r}; expected one of {' '.join(EXTENSIONS)}")
            out.append((str(given), p))
        else:
            raise InputError(f"{given}: no such file or folder")
    return sorted(set(out))


def load_document(source: str, path: Path, text_field: str = "text") -> Document:
    """Read one supported file into a Document."""
    ext = path.suffix.lower()
    if ext == ".pdf":
        return Document(source, path, _load_pdf(path))
    if ext == ".jsonl":
        return Document(source, path, _load_jsonl(path, text_field))
    raw = path.read_text(encoding="utf-8", errors="replace")
    if ext in (".html", ".htm"):
        raw = html_to_text(raw)
    elif ext == ".rst":
        raw = rst_headings_to_markdown(raw)
    return Document(source, path, [Part(raw)])


def _load_pdf(path: Path) -> list[Part]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        return [Part(page.extract_text() or "", page=i + 1) for i, page in enumerate(reader.pages)]
    except (PdfReadError, ValueError) as e:
        raise InputError(f"{path}: not a readable PDF ({e})") from e


def _load_jsonl(path: Path, text_field: str) -> list[Part]:
    parts = []
    expected = f"expected an object with a string field {text_field!r}"
    for rec, where in read_jsonl_records(path, "document", expected):
        if not isinstance(rec.get(text_field), str):
            raise InputError(f"{where}: {expected}")
        meta = {k: v for k, v in rec.items() if k != text_field and isinstance(v, str | int | float | bool)}
        parts.append(Part(rec[text_field], meta={"line": int(where.rpartition(":")[2]), **meta}))
    return parts


_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>:_.])\1{2,}\s*$")


def rst_headings_to_markdown(text: str) -> str:
    """Turn reStructuredText section titles (text over an underline) into `#` headings.

    Levels follow the order in which underline characters first appear, as docutils does.
    """
    lines, out, levels = text.splitlines(), [], []
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        title = line.strip() and not _RST_UNDERLINE.match(line)
        if title and _RST_UNDERLINE.match(nxt) and len(nxt.rstrip()) >= len(line.rstrip()):
            ch = nxt.strip()[0]
            if ch not in levels:
                levels.append(ch)
            out.append("#" * min(6, levels.index(ch) + 1) + " " + line.strip())
            i += 2
            continue
        if _RST_UNDERLINE.match(line) and nxt.strip() and i + 2 < len(lines) and lines[i + 2].strip() == line.strip():
            i += 1  # overline: the title follows with its underline
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: headings as `#` lines, blocks as paragraphs, boilerplate dropped."""

    SKIP = {"script", "style", "nav", "header", "footer", "aside", "noscript", "template", "svg", "form", "head"}
    BLOCK = {"p", "div", "section", "article", "main", "li", "ul", "ol", "table", "tr", "br", "pre", "blockquote",
             "dd", "dt", "figure", "figcaption"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.out.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCK:
            self.out.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCK:
            self.out.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Readable text of an HTML document (see `_HTMLText`)."""
    p = _HTMLText()
    p.feed(html)
    p.close()
    text = "".join(p.out)
    paras = [re.sub(r"[ \t]+", " ", x).strip() for x in re.split(r"\n\s*\n", text)]
    return "\n\n".join(x for x in paras if x and x != "#" * len(x.split()[0]))
