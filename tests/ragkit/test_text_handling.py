"""Text that is really text (issue 20): encodings detected, binary found anywhere, whitespace-free text
chunked by tokens, long queries warned about, third-party warnings naming the file."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ragkit.chunking import TokenChunker
from ragkit.pipeline import Pipeline
from ragkit.readers import SkipFile, read_parts

TEXT = "“Quoted” text — it costs 5 € and a naïve café serves it.\n\nA second paragraph follows here.\n"


def _read(path) -> tuple[str, str]:
    parts = list(read_parts(path))
    return "".join(p.text for p in parts), parts[0].encoding


def test_cp1252_file_keeps_its_real_characters(tmp_path):
    f = tmp_path / "legacy.txt"
    f.write_bytes((TEXT * 20).encode("cp1252"))
    text, encoding = _read(f)
    assert text == TEXT * 20 and encoding == "cp1252"


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32", "utf-8-sig"])
def test_unicode_with_a_byte_order_mark_is_text(tmp_path, codec):
    f = tmp_path / "unicode.txt"
    data = TEXT.encode(codec)
    if codec == "utf-16-be":
        data = b"\xfe\xff" + data  # Python's utf-16-be writes no BOM
    f.write_bytes(data)
    text, _ = _read(f)
    assert text == TEXT


def test_binary_without_nul_in_the_first_8_kib_is_skipped(tmp_path):
    f = tmp_path / "blob.txt"
    rng = np.random.default_rng(0)
    f.write_bytes(b"plain header line\n" * 600 + rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    with pytest.raises(SkipFile, match="binary"):
        _read(f)
    g = tmp_path / "blob-no-nul.txt"
    g.write_bytes(b"plain header line\n" * 600 + rng.integers(1, 256, 200_000, dtype=np.uint8).tobytes())
    with pytest.raises(SkipFile, match="binary"):
        _read(g)


def test_text_without_whitespace_is_chunked_by_tokens(embedder):
    chunker = TokenChunker(embedder.tokenizer, 256)
    text = "abcdefghij" * 20_000  # 200k characters, no space: one [UNK] "word" for BERT's tokenizer
    spans = chunker.split(text)
    assert len(spans) > 10
    for span in spans:
        ids = chunker.backend.encode(span.content(text)).ids
        assert len(ids) <= 256 and embedder.tokenizer.unk_token_id not in ids
    assert spans[0].start == 0 and spans[-1].end == len(text)


def test_long_query_is_truncated_with_a_warning(tmp_path, embedder):
    p = Pipeline(tmp_path / "ix", embed_model=embedder)
    p.ingest([_doc(tmp_path)], show_progress=False)
    with pytest.warns(UserWarning, match=r"the query has \d+ tokens; the embedder .* reads the first 256"):
        assert p.retrieve("journal " * 2000, top_k=1)


def _doc(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("The journal makes commits atomic. A hot journal needs rollback.")
    return f


def test_pdf_library_warnings_name_the_file(tmp_path, caplog):
    from pypdf import PdfWriter

    f = tmp_path / "report.pdf"
    w = PdfWriter()
    w.add_blank_page(200, 200)
    with open(f, "wb") as out:
        w.write(out)
    data = f.read_bytes()
    f.write_bytes(data.replace(b"startxref", b"startxref\n999999"[:9]).replace(b"%%EOF", b""))  # damage the trailer
    with caplog.at_level(logging.WARNING):
        try:
            list(read_parts(f))
        except SkipFile:
            pass
    pdf_records = [r for r in caplog.records if r.name.startswith(("pypdf", "ragkit"))]
    assert pdf_records, "damaged PDF gives pypdf warnings"
    assert all(str(f) in r.getMessage() for r in pdf_records), [r.getMessage() for r in pdf_records]
