"""Finding and reading input files: .txt/.md (streamed), .html (BeautifulSoup text), .pdf (pypdf).

Text comes out in *parts* of at most ``part_chars`` characters cut at paragraph (else line, else
space) boundaries, so a 200 MB file is never held in memory whole. Files that cannot be read become
:class:`Skipped` entries with a reason; nothing here raises for one bad file among many. Offsets are
offsets into the decoded text with newlines normalized to ``\\n``.

Encoding: a byte-order mark decides (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE); else a file that is valid
UTF-8 is UTF-8; else ``charset-normalizer`` names the legacy 8-bit encoding (cp1252 among equally good
candidates), and the chunks record it as ``encoding``. Binary content is looked for in every block of
the file, not only its head: a NUL byte or more than 10% control characters in any block (of a file
without a UTF-16/32 BOM), or bytes no encoding explains, skip the file as binary.
Warnings of the PDF library are re-issued with the file's path in front.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragkit.errors import IngestError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
DEFAULT_PART_CHARS = 1 << 20  # 1 Mi characters of text per part (a few hundred chunks)
_SNIFF_BYTES = 8192
_BLOCK_BYTES = 1 << 20
_CONTROL = bytes(sorted(set(range(32)) - {9, 10, 12, 13}))
_BOMS = (  # longest first: the UTF-32-LE mark starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
_DETECT_BYTES = 1 << 20  # how much of a non-UTF-8 file charset-normalizer looks at
log = logging.getLogger(__name__)


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
    """The codec of a text file (BOM, else UTF-8, else the detected legacy encoding); :class:`SkipFile`
    if it is empty or binary anywhere in it."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
        if not head:
            raise SkipFile("empty file")
        for bom, codec in _BOMS:
            if head.startswith(bom):
                return codec
        decoder = codecs.getincrementaldecoder("utf-8")()
        utf8 = True
        block = head
        while block:
            _check_not_binary(block)
            if utf8:
                try:
                    decoder.decode(block)
                except UnicodeDecodeError:
                    utf8 = False
            block = f.read(_BLOCK_BYTES)
        if utf8:
            try:
                decoder.decode(b"", final=True)
                return "utf-8-sig"
            except UnicodeDecodeError:
                pass
        f.seek(0)
        return _legacy_encoding(f.read(_DETECT_BYTES))


def _check_not_binary(block: bytes) -> None:
    if b"\x00" in block:
        raise SkipFile("binary content (NUL bytes) in a text file")
    if len(block) - len(block.translate(None, _CONTROL)) > 0.1 * len(block):
        raise SkipFile("binary content (mostly control characters) in a text file")


def _legacy_encoding(sample: bytes) -> str:
    """The 8-bit encoding charset-normalizer finds best for ``sample`` (cp1252 when it ties)."""
    from charset_normalizer import from_bytes

    results = list(from_bytes(sample))
    if not results:
        raise SkipFile("binary content (no text encoding explains its bytes) in a text file")
    best = results[0]
    tied = [r.encoding for r in results if (r.chaos, r.coherence) == (best.chaos, best.coherence)]
    return "cp1252" if "cp1252" in tied else best.encoding


def _stream_text(path: Path, encoding: str, part_chars: int) -> Iterator[TextPart]:
    # newline=None: \r\n and \r become \n; a legacy code page's few undefined bytes become U+FFFD
    errors = "strict" if encoding.startswith("utf") else "replace"
    with open(path, encoding=encoding, errors=errors, newline=None) as f:
        any_text = False
        blocks = iter(lambda: f.read(part_chars), "")
        try:
            for part in _cut_parts(blocks, encoding.replace("-sig", ""), part_chars):
                if part.text.strip():
                    any_text = True
                    yield part
        except UnicodeDecodeError as exc:
            raise SkipFile(f"not valid {encoding} although it starts with its byte-order mark ({exc.reason} "
                           f"at byte {exc.start} of a block)") from None
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


@contextlib.contextmanager
def _named_warnings(path: Path, logger_name: str) -> Iterator[None]:
    """Re-issue the log records and warnings of a third-party reader with ``path`` in front."""

    make_record = logging.getLogRecordFactory()

    def named(name: str, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(name, *args, **kwargs)
        if name == logger_name or name.startswith(logger_name + "."):  # the library's loggers, made lazily
            record.msg, record.args = f"{path}: {record.getMessage()}", None
        return record

    logging.setLogRecordFactory(named)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logging.setLogRecordFactory(make_record)
    for w in caught:
        warnings.warn(f"{path}: {w.message}", w.category, stacklevel=3)


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        with _named_warnings(path, "pypdf"):
            reader = PdfReader(str(path))
            if reader.is_encrypted:
                raise SkipFile("encrypted PDF")
            pages = [page.extract_text() or "" for page in reader.pages]
    except SkipFile:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise SkipFile(f"cannot read PDF ({type(exc).__name__}: {exc})") from None
    return "\n\n".join(p.strip() for p in pages if p.strip())
