"""Build the plain-text corpora in corpora/ from Debian packages (and one text written here).

Run ``python corpora/build.py``. It downloads ``sqlite3-doc``, ``python3.11-doc`` (or
``python3-doc``) and ``r-cran-janeaustenr`` with ``apt-get download`` into a temporary directory,
unpacks them with ``dpkg -x``, converts the selected HTML pages (and two of the novels, stored
as R character vectors) to plain text and writes:

- ``corpora/sqlite/<page>.txt`` and ``corpora/sqlite/NOTICE``
- ``corpora/python/<section>_<page>.txt`` and ``corpora/python/NOTICE``
- ``corpora/austen/<novel>.txt`` and ``corpora/austen/NOTICE`` (public-domain novels)
- ``corpora/noise/noise.txt`` and ``corpora/noise/NOTICE`` (content-free filler, RULER-style)

Text format (what ``corpora/qa`` and the tests rely on): the first line is the page title,
then a blank line, then blocks (heading, paragraph, list item, table row, code block)
separated by exactly one blank line. Inside prose blocks every run of whitespace is one
space; code blocks keep their lines (trailing spaces and blank lines inside them dropped).
Files are UTF-8 (NFC), end with one newline, and their names are stable.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bs4 import BeautifulSoup, Comment, NavigableString, Tag
from tqdm import tqdm

CORPORA = Path(__file__).resolve().parent

SQLITE_PACKAGE = "sqlite3-doc"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_NOVELS = {"prideprejudice": "pride_and_prejudice", "persuasion": "persuasion"}  # R object -> file stem
# The noise haystack: sentences that say nothing (after RULER's "The grass is green. The sky is blue. ..."),
# of different lengths so a prompt can be fitted to an exact token count, repeated in a fixed order.
NOISE_SENTENCES = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go, there and back again.",
    "The river flows slowly past the old stone bridge.", "A day follows another day, and then another one.",
    "The wind moves the leaves and the leaves move a little.",
    "Nothing in particular happens here, and that is quite all right.",
    "The road goes on and on, past fields, past hills, and past more fields again.", "Clouds pass by slowly.",
    "Time goes by, as it always does, one hour after the other, without any hurry at all.", "It is calm here."
)
NOISE_REPEATS = 400
PYTHON_PACKAGE = "python3.11-doc"
PYTHON_FALLBACK = "python3-doc"  # a metapackage: its python3.N-doc dependency holds the HTML

# SQLite prose pages (file stems under /usr/share/doc/sqlite3). Left out on purpose: the
# C API reference (c3ref/), syntax diagrams, release logs and change lists, keyword and
# title indexes, the opcode and result-code tables, news, and pages about the project
# rather than the software (crew, support, consortium, ...).
SQLITE_PAGES = (
    "about", "arch", "atomiccommit", "autoinc", "backup", "cintro", "cli", "compile",
    "datatype3", "different", "expridx", "fasterthanfs", "faq", "fileformat2",
    "foreignkeys", "fts3", "fts5", "gencol", "howtocorrupt", "inmemorydb", "isolation",
    "json1", "lang_altertable", "lang_analyze", "lang_attach", "lang_createindex",
    "lang_createtable", "lang_createtrigger", "lang_createview", "lang_datefunc",
    "lang_expr", "lang_insert", "lang_select", "lang_transaction", "lang_upsert",
    "lang_vacuum", "lang_with", "limits", "loadext", "lockingv3", "malloc", "mmap",
    "nulls", "optoverview", "partialindex", "pragma", "queryplanner", "queryplanner-ng",
    "quirks", "rowidtable", "rtree", "security", "serverless", "sharedcache",
    "stricttables", "tempfiles", "testing", "threadsafe", "uri", "vtab", "wal",
    "whentouse", "windowfunctions", "withoutrowid", "zeroconf", "lang_returning",
)

# Python documentation: whole sections (their index pages are only tables of contents)
# plus single pages. reference/grammar is the PEG grammar, code rather than prose.
PYTHON_SECTIONS = ("tutorial", "howto", "faq", "reference")
PYTHON_SKIP = {"tutorial/index", "howto/index", "faq/index", "reference/index", "reference/grammar"}
PYTHON_PAGES = ("glossary",)
PYTHON_MAX_BYTES = 8_000_000
MAIN = 'div[role="main"]'  # the page content in Sphinx's HTML

# Elements whose content is never text we want.
DROP_TAGS = {
    "script", "style", "noscript", "svg", "img", "form", "select", "input", "button",
    "nav", "header", "footer", "map", "area", "iframe", "object", "head",
}
# Navigation, sidebars, tables of contents, diagrams (SQLite and Sphinx themes).
DROP_CLASSES = {
    "menu", "mainmenu", "submenu", "searchmenu", "tagline", "logo", "fancy_title",
    "fancy_toc", "rightsidebar", "imgcontainer", "pikchr", "related", "sphinxsidebar",
    "footer", "headerlink", "linenos", "toctree-wrapper", "clearer", "mobile-nav",
    "inline-search", "version_switcher_placeholder", "language_switcher_placeholder",
}
BLOCK_TAGS = {
    "p", "div", "section", "article", "main", "body", "html", "blockquote", "center",
    "ul", "ol", "li", "dl", "dt", "dd", "table", "thead", "tbody", "tfoot", "tr", "caption",
    "h1", "h2", "h3", "h4", "h5", "h6", "pre", "figure", "figcaption", "aside", "hr",
    "address", "font", "var",
}
CELL_TAGS = {"td", "th"}
WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Package:
    """A downloaded and unpacked Debian package."""

    name: str
    version: str
    root: Path


class _Blocks:
    """Collects text blocks while walking the DOM: inline text accumulates until a block ends."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self._inline: list[str] = []
        self._prefix = ""

    def text(self, s: str) -> None:
        self._inline.append(s)

    def set_prefix(self, prefix: str) -> None:
        """A marker (list bullet, ``Note:``) put before the next paragraph."""
        self.flush()
        self._prefix = prefix

    def flush(self) -> None:
        para = WS.sub(" ", "".join(self._inline)).strip()
        self._inline = []
        if para:
            self.blocks.append(self._prefix + para)
            self._prefix = ""

    def code(self, s: str) -> None:
        self.flush()
        lines = [ln.rstrip() for ln in s.expandtabs(8).split("\n")]
        lines = [ln for ln in lines if ln.strip()]
        if lines:
            indent = min(len(ln) - len(ln.lstrip()) for ln in lines)
            self.blocks.append(self._prefix + "\n".join(ln[indent:] for ln in lines))
            self._prefix = ""


def _dropped(el: Tag) -> bool:
    if el.name in DROP_TAGS:
        return True
    classes = el.get("class") or []
    if isinstance(classes, str):
        classes = classes.split()
    if DROP_CLASSES.intersection(classes):
        return True
    if el.name == "p" and el.find("button", onclick=True):
        return True  # SQLite: the label and show/hide button of a dropped syntax diagram
    return el.get("role") == "navigation"


def _is_label(el: Tag) -> bool:
    """Sphinx labels read as a prefix of the next paragraph: ``Note: ...``, ``Author: ...``."""
    if el.name == "p":
        return "admonition-title" in (el.get("class") or [])
    parent = el.parent
    return el.name == "dt" and parent is not None and "field-list" in (parent.get("class") or [])


def _walk(el: Tag, out: _Blocks) -> None:
    for child in el.children:
        if isinstance(child, Comment):
            continue
        if isinstance(child, NavigableString):
            out.text(str(child))
            continue
        if not isinstance(child, Tag) or _dropped(child):
            continue
        name = child.name
        if name == "br":
            out.text(" ")
        elif name == "pre":
            out.code(child.get_text())
        elif name == "tr":
            out.flush()
            cells = [_cell_text(c) for c in child.find_all(CELL_TAGS, recursive=False)]
            out.text(" | ".join(c for c in cells if c))
            out.flush()
        elif name == "li":
            parent = child.parent
            if parent is not None and parent.name == "ol":
                index = sum(1 for s in child.find_previous_siblings("li") if s.parent is parent) + 1
                out.set_prefix(f"{index}. ")
            else:
                out.set_prefix("- ")
            _walk(child, out)
            out.flush()
        elif _is_label(child):
            out.set_prefix(WS.sub(" ", child.get_text()).strip().rstrip(":") + ": ")
        elif name in BLOCK_TAGS:
            out.flush()
            _walk(child, out)
            out.flush()
        else:
            _walk(child, out)


def _cell_text(cell: Tag) -> str:
    """A table cell on one line (its own paragraphs, if any, joined by spaces)."""
    out = _Blocks()
    _walk(cell, out)
    out.flush()
    return WS.sub(" ", " ".join(out.blocks)).strip()


def html_to_text(html: str, root_selector: str | None = None) -> tuple[str, str]:
    """Convert one HTML page to ``(title, body)``; body blocks are separated by blank lines."""
    soup = BeautifulSoup(html, "lxml")  # repairs unclosed <li>/<td> like a browser
    if root_selector:  # Sphinx: the page's <h1> is its title; <title> adds the release name
        root = soup.select_one(root_selector)
        if root is None:
            raise ValueError(f"no element matches {root_selector!r}")
        heading = root.find("h1")
        title = heading.get_text().replace("¶", "") if heading else ""
    else:  # SQLite: <title> is the page title
        root = soup.body or soup
        title = soup.title.get_text() if soup.title else ""
    title = WS.sub(" ", title).strip()
    out = _Blocks()
    _walk(root, out)
    out.flush()
    blocks = [b for b in out.blocks if not b.startswith("This page last modified on")]
    if blocks and _same_heading(blocks[0], title):
        blocks = blocks[1:]
    body = unicodedata.normalize("NFC", "\n\n".join(blocks))
    return unicodedata.normalize("NFC", title), body


def _same_heading(block: str, title: str) -> bool:
    strip = re.compile(r"^[\d.]+\s*")
    return strip.sub("", block).casefold() == strip.sub("", title).casefold()


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return proc.stdout


def _available(name: str) -> bool:
    return bool(re.search(r"Candidate: (?!\(none\))", _run(["apt-cache", "policy", name])))


def python_doc_package() -> str:
    """``python3.11-doc`` when apt has it, else the ``python3.N-doc`` that ``python3-doc`` needs."""
    if _available(PYTHON_PACKAGE):
        return PYTHON_PACKAGE
    deps = re.findall(r"Depends: (python3\.\d+-doc)", _run(["apt-cache", "depends", PYTHON_FALLBACK]))
    if not deps:
        raise SystemExit(f"neither {PYTHON_PACKAGE} nor {PYTHON_FALLBACK} is available from apt")
    return deps[0]


def fetch(name: str, workdir: Path) -> Package:
    """Download the Debian package ``name`` and unpack it under ``workdir``."""
    if not _available(name):
        raise SystemExit(f"{name} is not available from apt; check /etc/apt/sources.list")
    _run(["apt-get", "download", name], cwd=workdir)
    (deb,) = workdir.glob(f"{name}_*.deb")
    version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    root = workdir / name
    _run(["dpkg", "-x", str(deb), str(root)])
    return Package(name, version, root)


def _write_txt(path: Path, title: str, body: str) -> int:
    data = f"{title}\n\n{body}\n".encode("utf-8")
    path.write_bytes(data)
    return len(data)


def _reset(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    for old in outdir.glob("*.txt"):
        old.unlink()


def build_sqlite(pkg: Package, outdir: Path) -> tuple[int, int]:
    """Convert the SQLite prose pages; return (files, bytes)."""
    src = pkg.root / "usr/share/doc/sqlite3"
    _reset(outdir)
    total = 0
    for stem in tqdm(sorted(SQLITE_PAGES), desc="sqlite", unit="page"):
        title, body = html_to_text((src / f"{stem}.html").read_text(encoding="utf-8"))
        total += _write_txt(outdir / f"{stem}.txt", title, body)
    copyright_text = (pkg.root / "usr/share/doc/sqlite3-doc/copyright").read_text(encoding="utf-8")
    notice = (
        f"Source: Debian package {pkg.name} {pkg.version} (the SQLite documentation, "
        "https://www.sqlite.org/).\n\n"
        "Licence: public domain. The SQLite source code and documentation were dedicated to\n"
        "the public domain by their authors (see https://www.sqlite.org/copyright.html).\n"
        "The package's copyright file says:\n\n"
        + _indent(copyright_text)
        + "\nThe *.txt files here are plain-text conversions of "
        f"{len(SQLITE_PAGES)} HTML pages of that\npackage, made by corpora/build.py "
        "(navigation, scripts, diagrams and tables of\ncontents removed; text otherwise "
        "unchanged).\n"
    )
    (outdir / "NOTICE").write_text(notice, encoding="utf-8")
    return len(SQLITE_PAGES), total


def _python_pages(html_root: Path) -> Iterator[tuple[str, Path]]:
    for section in PYTHON_SECTIONS:
        for page in sorted((html_root / section).glob("*.html")):
            key = f"{section}/{page.stem}"
            if key not in PYTHON_SKIP:
                yield f"{section}_{page.stem}", page
    for stem in PYTHON_PAGES:
        yield stem, html_root / f"{stem}.html"


def _psf_licence(copyright_text: str) -> str:
    """The "Python License" part of the Debian copyright file (history and terms)."""
    start = copyright_text.index("Python License\n====")
    end = copyright_text.index("Licenses and Acknowledgements for Incorporated Software")
    return copyright_text[start:end].rstrip() + "\n"


def _python_terms(html_root: Path) -> str:
    """The copyright lines (copyright.html) and licence terms (license.html) of the docs."""
    _, copyright_page = html_to_text((html_root / "copyright.html").read_text(encoding="utf-8"), MAIN)
    _, licence_page = html_to_text((html_root / "license.html").read_text(encoding="utf-8"), MAIN)
    terms = [
        para
        for para in licence_page.split("\n\n")
        if para.startswith(("Python software and documentation are licensed", "Starting with Python"))
    ]
    return "\n\n".join([copyright_page, *terms])


def build_python(pkg: Package, outdir: Path) -> tuple[int, int]:
    """Convert tutorial, HOWTOs, FAQ, language reference and glossary; return (files, bytes)."""
    doc = pkg.root / "usr/share/doc"
    html_root = next(p for p in sorted(doc.glob("python3*/html")) if (p / "glossary.html").exists())
    _reset(outdir)
    pages = list(_python_pages(html_root))
    total = 0
    for name, page in tqdm(pages, desc="python", unit="page"):
        title, body = html_to_text(page.read_text(encoding="utf-8"), MAIN)
        total += _write_txt(outdir / f"{name}.txt", title, body)
    if total > PYTHON_MAX_BYTES:
        raise SystemExit(f"python corpus is {total} bytes, over {PYTHON_MAX_BYTES}: drop pages")
    copyright_file = doc / pkg.name / "copyright"
    notice = (
        f"Source: Debian package {pkg.name} {pkg.version} (the Python documentation, "
        "https://docs.python.org/).\n\n"
        + _python_terms(html_root)
        + "\n\nLicence: the Python Software Foundation License Version 2 (PSF licence). Its text,\n"
        "with the history and the earlier licences, copied from the package's copyright file\n"
        f"({copyright_file.relative_to(pkg.root).as_posix()}), follows.\n\n"
        + _psf_licence(copyright_file.read_text(encoding="utf-8"))
        + "\nThe *.txt files here are plain-text conversions of "
        f"{len(pages)} HTML pages of that package\n(tutorial, HOWTOs, FAQ, language reference, "
        "glossary), made by corpora/build.py\n(navigation, sidebars, scripts and permalink "
        "marks removed; text otherwise unchanged).\n"
    )
    (outdir / "NOTICE").write_text(notice, encoding="utf-8")
    return len(pages), total


def r_character_vector(blob: bytes) -> list[str]:
    """The strings of an R character vector serialized in XDR format (``X\\n``, version 2 or 3), as R's
    lazy-load data bases store a data set; NA elements are dropped."""
    import struct

    if blob[:2] != b"X\n":
        raise SystemExit("not an XDR-serialized R object")
    pos = 2
    version, = struct.unpack(">i", blob[pos:pos + 4])
    pos += 12
    if version == 3:
        n, = struct.unpack(">i", blob[pos:pos + 4])
        pos += 4 + n  # native encoding name
    flags, length = struct.unpack(">ii", blob[pos:pos + 8])
    if flags & 0xFF != 16:  # STRSXP
        raise SystemExit(f"expected a character vector (type 16), found type {flags & 0xFF}")
    pos += 8
    out = []
    for _ in range(length):
        _, n = struct.unpack(">ii", blob[pos:pos + 8])
        pos += 8
        if n >= 0:
            out.append(blob[pos:pos + n].decode("utf-8"))
            pos += n
    return out


def _lazyload(data_dir: Path) -> dict[str, bytes]:
    """The serialized objects of an R package's data/Rdata.rdb by name. The index (Rdata.rdx) is a list whose
    ``variables`` element holds one (offset, length) integer pair per object, named in order."""
    import gzip
    import struct
    import zlib

    index = gzip.decompress((data_dir / "Rdata.rdx").read_bytes())
    pairs = [struct.unpack(">ii", m.group(1)) for m in re.finditer(rb"\x00\x00\x00\x0d\x00\x00\x00\x02(.{8})",
                                                                    index, re.S)]
    names = []
    for m in re.finditer(rb"\x00\x04\x00\x09\x00\x00\x00([\x01-\x7f])", index):
        name = index[m.end(): m.end() + m.group(1)[0]].decode("ascii", "replace")
        if name.isidentifier() and name not in ("names", "variables", "references", "compressed"):
            names.append(name)
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    return {name: zlib.decompress(rdb[off + 4: off + ln]) for name, (off, ln) in zip(names, pairs)}


def austen_text(lines: list[str]) -> tuple[str, str]:
    """Title and body of a novel given as its lines (Project Gutenberg's layout: paragraphs separated by empty
    lines): paragraphs joined into one line each, chapter headings kept as their own blocks."""
    paras, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(unicodedata.normalize("NFC", " ".join(" ".join(cur).split())))
            cur = []
    title = paras[0].title()
    return title, "\n\n".join(p for p in paras[1:] if p.lower() != "by jane austen")


def build_austen(pkg: Package, outdir: Path) -> tuple[int, int]:
    """Two of Jane Austen's novels from the R package's data; return (files, bytes)."""
    data = _lazyload(next((pkg.root / "usr/lib/R/site-library").glob("janeaustenr/data")))
    _reset(outdir)
    total = 0
    for name, stem in AUSTEN_NOVELS.items():
        title, body = austen_text(r_character_vector(data[name]))
        total += _write_txt(outdir / f"{stem}.txt", title, body)
    copyright_file = pkg.root / "usr/share/doc" / pkg.name / "copyright"
    notice = (
        f"Source: Debian package {pkg.name} {pkg.version} (the R package janeaustenr by Julia Silge,\n"
        "https://cran.r-project.org/package=janeaustenr), which ships the text of Jane Austen's six\n"
        "novels as prepared by Project Gutenberg.\n\n"
        "Licence of the text: public domain. Jane Austen died in 1817; Pride and Prejudice (1813) and\n"
        "Persuasion (1817/1818) are in the public domain. The Project Gutenberg licence text and\n"
        "trademark do not come with the package's data and are not used here.\n\n"
        "The package's copyright file (it covers the R code and data packaging, MIT licence) says:\n\n"
        + _indent(copyright_file.read_text(encoding="utf-8"))
        + f"\nThe *.txt files here ({', '.join(f'{s}.txt' for s in AUSTEN_NOVELS.values())}) are the\n"
        "package's line vectors of those two novels joined into paragraphs by corpora/build.py\n"
        "(text otherwise unchanged).\n"
    )
    (outdir / "NOTICE").write_text(notice, encoding="utf-8")
    return len(AUSTEN_NOVELS), total


def build_noise(outdir: Path) -> tuple[int, int]:
    """The content-free noise haystack; return (files, bytes)."""
    import random

    _reset(outdir)
    rng = random.Random("noise")
    blocks = []
    for _ in range(NOISE_REPEATS):
        order = list(NOISE_SENTENCES)
        rng.shuffle(order)
        blocks.append(" ".join(order))
    total = _write_txt(outdir / "noise.txt", "Noise", "\n\n".join(blocks))
    (outdir / "NOTICE").write_text(
        "Written for ragkit (corpora/build.py: NOISE_SENTENCES, shuffled in a fixed order and repeated).\n"
        "After the 'noise' haystack of RULER (Hsieh et al., 2024): sentences that carry no content.\n"
        "Licence: public domain (CC0 1.0); no third-party text.\n", encoding="utf-8")
    return 1, total


def _indent(text: str) -> str:
    return "".join(f"    {ln}".rstrip() + "\n" for ln in text.rstrip().split("\n"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=CORPORA, help="output directory (default: corpora/)")
    parser.add_argument("--no-update", action="store_true", help="skip `apt-get update`")
    args = parser.parse_args(argv)
    if not args.no_update:
        _run(["apt-get", "update"])
    with tempfile.TemporaryDirectory(prefix="ragkit-corpora-") as tmp:
        work = Path(tmp)
        sqlite = fetch(SQLITE_PACKAGE, work)
        python = fetch(python_doc_package(), work)
        austen = fetch(AUSTEN_PACKAGE, work)
        for label, (files, size) in (
            (f"sqlite ({sqlite.name} {sqlite.version})", build_sqlite(sqlite, args.out / "sqlite")),
            (f"python ({python.name} {python.version})", build_python(python, args.out / "python")),
            (f"austen ({austen.name} {austen.version})", build_austen(austen, args.out / "austen")),
            ("noise (written here)", build_noise(args.out / "noise")),
        ):
            print(f"{label}: {files} files, {size:,} bytes")


if __name__ == "__main__":
    main()
