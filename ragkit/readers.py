"""Finding and reading input files: .txt/.md (streamed), .html (BeautifulSoup text), .pdf (pypdf).

Text comes out in *parts* of at most ``part_chars`` characters cut at paragraph (else line, else
space) boundaries, so a 200 MB file is never held in memory whole. Files that cannot be read become
:class:`Skipped` entries with a reason; nothing here raises for one bad file among many. Offsets are
offsets into the decoded text with newlines normalized to ``\\n``.

Encoding: UTF-8 (a BOM is dropped); a file that is not valid UTF-8 is decoded as latin-1 (every byte
is a latin-1 character, so this never fails) and its chunks record ``encoding: latin-1``. A file whose
first 8 KiB hold NUL bytes or mostly control characters is skipped as binary.
"""

from __future__ import annotations

import codecs
import errno
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ragkit.errors import IngestError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
DEFAULT_PART_CHARS = 1 << 20  # 1 Mi characters of text per part (a few hundred chunks)
_SNIFF_BYTES = 8192
_BLOCK_BYTES = 1 << 20
_CONTROL = set(range(32)) - {9, 10, 12, 13}


@dataclass(frozen=True)
class Skipped:
    """An input that was not ingested, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class TextPart:
    """A piece of a file's decoded text and where it starts in that text."""

    text: str
    char_start: int
    encoding: str


class SkipFile(Exception):
    """Raised by a reader for a file that cannot be ingested; the message is the reason."""


def discover(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[Skipped]]:
    """Files to read under ``paths`` (sorted, deduplicated, absolute) and the entries skipped on the way.

    A missing path, or a path given explicitly that is a symlink loop, raises :class:`IngestError`
    before anything is read. Inside directories, hidden entries, unsupported suffixes, broken links
    and symlink loops are skipped with a reason; symlinked directories are followed once.
    """
    files: dict[str, Path] = {}
    skipped: list[Skipped] = []
    roots = [Path(p) for p in paths]
    for root in roots:
        if not os.path.lexists(root):
            raise IngestError(f"{root}: no such file or directory. Check the path; nothing was ingested.")
        try:
            resolved = root.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise IngestError(f"{root}: {_link_problem(exc)}. Fix or remove the link; nothing was ingested.") from None
        if resolved.is_dir():
            _walk(resolved, files, skipped)
        else:
            _add_file(resolved, files, skipped, explicit=True)
    return [files[k] for k in sorted(files)], skipped


def _link_problem(exc: BaseException) -> str:
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return "symlink loop (the link points back to itself)"
    return f"cannot be resolved ({exc})"


def _walk(top: Path, files: dict[str, Path], skipped: list[Skipped]) -> None:
    seen_dirs: set[str] = set()
    stack = [top]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen_dirs:
            skipped.append(Skipped(str(d), "directory already visited (symlink cycle)"))
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(Skipped(str(d), f"cannot list directory ({exc.strerror})"))
            continue
        subdirs = []
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                skipped.append(Skipped(str(path), "hidden"))
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                os.stat(path)  # raises for broken links and loops
            except OSError as exc:
                reason = _link_problem(exc) if exc.errno == errno.ELOOP else f"broken link or unreadable ({exc.strerror})"
                skipped.append(Skipped(str(path), reason))
                continue
            if is_dir:
                subdirs.append(path)
            else:
                _add_file(path, files, skipped, explicit=False)
        stack.extend(reversed(subdirs))


def _add_file(path: Path, files: dict[str, Path], skipped: list[Skipped], *, explicit: bool) -> None:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        what = f"'{suffix}'" if suffix else "no suffix"
        skipped.append(Skipped(str(path), f"unsupported file type ({what}); ragkit reads {' '.join(sorted(SUPPORTED))}"))
        return
    if not path.is_file():
        skipped.append(Skipped(str(path), "not a regular file"))
        return
    files.setdefault(str(path.absolute()), path.absolute())


def read_parts(path: Path, part_chars: int = DEFAULT_PART_CHARS) -> Iterator[TextPart]:
    """The text of ``path`` in parts; raises :class:`SkipFile` with a reason for an unreadable file."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        encoding = _text_encoding(path)
        yield from _stream_text(path, encoding, part_chars)
        return
    if suffix in HTML_SUFFIXES:
        text = _html_text(path)
    elif suffix in PDF_SUFFIXES:
        text = _pdf_text(path)
    else:
        raise SkipFile(f"unsupported file type '{suffix}'")
    if not text.strip():
        raise SkipFile("no text (empty document)")
    yield from _cut_parts(iter([text]), "utf-8", part_chars)


def _text_encoding(path: Path) -> str:
    """'utf-8-sig' when the whole file decodes as UTF-8, else 'latin-1'; :class:`SkipFile` if binary."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
        if not head:
            raise SkipFile("empty file")
        if b"\x00" in head:
            raise SkipFile("binary content (NUL bytes) in a text file")
        if sum(b in _CONTROL for b in head) > 0.1 * len(head):
            raise SkipFile("binary content (mostly control characters) in a text file")
        decoder = codecs.getincrementaldecoder("utf-8")()
        block = head
        try:
            while block:
                decoder.decode(block)
                block = f.read(_BLOCK_BYTES)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "latin-1"
    return "utf-8-sig"


def _stream_text(path: Path, encoding: str, part_chars: int) -> Iterator[TextPart]:
    with open(path, encoding=encoding, newline=None) as f:  # newline=None: \r\n and \r become \n
        any_text = False
        for part in _cut_parts(iter(lambda: f.read(part_chars), ""), encoding.replace("-sig", ""), part_chars):
            if part.text.strip():
                any_text = True
                yield part
    if not any_text:
        raise SkipFile("empty file (whitespace only)")


def _cut_parts(blocks: Iterator[str], encoding: str, part_chars: int) -> Iterator[TextPart]:
    """Re-cuts a stream of text blocks into parts ending at paragraph/line/space boundaries."""
    buffer, start = "", 0
    for block in blocks:
        buffer += block
        while len(buffer) >= part_chars:
            cut = _boundary(buffer, part_chars)
            yield TextPart(buffer[:cut], start, encoding)
            start += cut
            buffer = buffer[cut:]
    if buffer:
        yield TextPart(buffer, start, encoding)


def _boundary(text: str, limit: int) -> int:
    """Index at which to cut ``text`` at most ``limit`` chars in: after a blank line, newline or space."""
    window = text[:limit]
    for sep in ("\n\n", "\n", " "):
        i = window.rfind(sep, limit // 2)
        if i > 0:
            return i + len(sep)
    return limit


_BLOCK_TAGS = (
    "p", "div", "section", "article", "header", "footer", "aside", "nav", "main", "blockquote", "pre",
    "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "tr", "table", "ul", "ol", "dl", "br", "hr",
    "title", "figure", "figcaption",
)  # fmt: skip
_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANKS = re.compile(r"\n\s*\n\s*")


def _html_text(path: Path) -> str:
    from bs4 import BeautifulSoup

    raw = path.read_bytes()
    if b"\x00" in raw[:_SNIFF_BYTES]:
        raise SkipFile("binary content (NUL bytes) in an HTML file")
    try:
        soup = BeautifulSoup(raw, "lxml")
    except Exception:  # lxml missing or failing: the stdlib parser
        soup = BeautifulSoup(raw, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    for tag in soup.find_all(_BLOCK_TAGS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    text = soup.get_text()
    paragraphs = (_SPACES.sub(" ", " ".join(p.split("\n"))).strip() for p in _BLANKS.split(text))
    return "\n\n".join(p for p in paragraphs if p)


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise SkipFile("encrypted PDF")
        pages = [page.extract_text() or "" for page in reader.pages]
    except SkipFile:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise SkipFile(f"cannot read PDF ({type(exc).__name__}: {exc})") from None
    return "\n\n".join(p.strip() for p in pages if p.strip())
