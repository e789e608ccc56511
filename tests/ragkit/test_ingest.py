"""Readers, token-aware chunking and deduplicating ingestion, on real files with the real MiniLM tokenizer.

Bad inputs from issue 3 live here and in test_pipeline.py: each asserts the message or skip reason and
that nothing already stored was lost.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from llama_index.core.schema import Document

from ragkit.chunking import TokenChunker
from ragkit.errors import IngestError
from ragkit.ingest import Ingestor
from ragkit.readers import discover, read_parts
from ragkit.store import FaissVectorStore

CORPUS = Path(__file__).resolve().parents[2] / "corpora"


@pytest.fixture()
def ingestor(embedder):
    return Ingestor(embedder, FaissVectorStore.from_embedder(embedder))


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _chunks_of(store: FaissVectorStore, file: Path) -> list:
    nodes = [n for n in store.get_nodes() if n.metadata["file_path"] == str(file)]
    return sorted(nodes, key=lambda n: (n.metadata["part"], n.metadata["chunk_index"]))


# ---- chunking --------------------------------------------------------------------------------------

def _hard_text() -> str:
    """Real prose plus the cases that break naive splitters: a huge sentence, a huge word, tiny lines."""
    prose = "\n\n".join(p.read_text() for p in sorted((CORPUS / "sqlite").glob("*.txt"))[:4])
    giant_sentence = " ".join(f"clause{i} of a run-on sentence that never ends" for i in range(200)) + "."
    giant_word = "x" * 5000
    return prose + "\n\n" + giant_sentence + "\n\n" + giant_word + " tail.\n\nShort.\nLine.\n"


def test_no_chunk_exceeds_max_seq_length_including_special_tokens(embedder):
    text = _hard_text()
    tok = embedder.tokenizer
    spans = TokenChunker(tok, embedder.max_seq_length).split(text)
    lengths = [len(tok(s.content(text), truncation=False)["input_ids"]) for s in spans]
    assert max(lengths) <= embedder.max_seq_length == 256
    assert max(lengths) >= 250, "chunks should be packed close to the limit"
    # counts the chunker reports are the real ones (special tokens excluded)
    assert [s.n_tokens + 2 for s in spans] == lengths
    # nothing is lost: every character of the input is in exactly one chunk, in order (the giant word is
    # cut into pieces the tokenizer can read, joined by spaces)
    assert "".join("".join(s.content(text).split()) for s in spans) == "".join(text.split())
    assert tok.unk_token_id not in {i for s in spans for i in tok(s.content(text))["input_ids"]}


def test_chunks_end_at_sentence_boundaries_unless_marked(embedder):
    text = _hard_text()
    spans = TokenChunker(embedder.tokenizer, 256).split(text)
    cut = [s for s in spans if s.cut_mid_sentence]
    assert cut, "the run-on sentence and the 5000-char word must be split at token boundaries"
    for s in spans:
        if not s.cut_mid_sentence:
            piece = text[s.start : s.end]
            # a sentence end, or the end of a paragraph/line (headings, list items, the final line)
            assert piece[-1] in ".!?:)\"'" or text[s.end : s.end + 1] in ("\n", ""), piece[-80:]


def test_smaller_chunk_size(embedder):
    text = _hard_text()
    spans = TokenChunker(embedder.tokenizer, 256, chunk_tokens=128).split(text)
    assert max(len(embedder.tokenizer(text[s.start : s.end])["input_ids"]) for s in spans) <= 128


# ---- readers ---------------------------------------------------------------------------------------

def _minimal_pdf(text: str) -> bytes:
    """A one-page PDF with ``text`` in Helvetica (xref offsets computed, so pypdf reads it cleanly)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_readers_html_pdf_markdown(tmp_path):
    html = _write(tmp_path / "page.html", "<html><head><title>T</title><script>var x=1;</script></head><body>"
                  "<h1>Hot journals</h1><p>A <b>hot</b> journal needs rollback.</p><ul><li>one</li><li>two</li></ul></body></html>")
    text = "".join(p.text for p in read_parts(html))
    assert "var x" not in text
    assert "A hot journal needs rollback." in text
    assert "Hot journals\n\nA hot" in text and "one\n\ntwo" in text

    pdf = _write(tmp_path / "doc.pdf", _minimal_pdf("The WAL file holds committed pages."))
    assert "The WAL file holds committed pages." in "".join(p.text for p in read_parts(pdf))

    md = _write(tmp_path / "notes.md", "# Title\n\nSome *markdown* text.\n")
    assert "".join(p.text for p in read_parts(md)) == "# Title\n\nSome *markdown* text.\n"


def test_large_text_is_read_in_parts_with_exact_offsets(tmp_path):
    para = "The pager writes pages to the journal before changing the database file.\n\n"
    big = _write(tmp_path / "big.txt", para * 2000)
    parts = list(read_parts(big, part_chars=10_000))
    assert len(parts) > 10 and all(len(p.text) <= 10_000 for p in parts)
    assert "".join(p.text for p in parts) == para * 2000
    assert all(p.char_start == sum(len(q.text) for q in parts[:i]) for i, p in enumerate(parts))
    assert all(p.text.endswith("\n\n") for p in parts[:-1]), "parts end at paragraph boundaries"


def test_discover_skips_unsupported_hidden_and_broken_with_reasons(tmp_path):
    _write(tmp_path / "a.txt", "Alpha.")
    _write(tmp_path / "sub" / "b.md", "Beta.")
    _write(tmp_path / "data.csv", "1,2")
    _write(tmp_path / ".hidden.txt", "secret")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    (tmp_path / "sub" / "up").symlink_to(tmp_path)  # a directory cycle
    files, skipped = discover([tmp_path])
    assert [f.name for f in files] == ["a.txt", "b.md"]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert "unsupported file type ('.csv')" in reasons["data.csv"]
    assert reasons[".hidden.txt"] == "hidden"
    assert "broken link" in reasons["dangling.txt"]
    assert "symlink loop" in reasons["loop.txt"]
    assert "symlink cycle" in reasons["up"]


# ---- bad inputs ------------------------------------------------------------------------------------

def test_missing_path_raises_before_anything_changes(tmp_path, ingestor):
    good = _write(tmp_path / "good.txt", "SQLite is a library.")
    ingestor.ingest([good], show_progress=False)
    before = ingestor.vector_store.node_count
    with pytest.raises(IngestError, match=r"no-such\.txt: no such file or directory"):
        ingestor.ingest([good, tmp_path / "no-such.txt"], show_progress=False)
    assert ingestor.vector_store.node_count == before


def test_symlink_loop_given_explicitly_is_an_error(tmp_path, ingestor):
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)
    with pytest.raises(IngestError, match="symlink loop"):
        ingestor.ingest([loop], show_progress=False)


def test_empty_binary_and_latin1_files(tmp_path, ingestor):
    empty = _write(tmp_path / "empty.txt", "")
    blank = _write(tmp_path / "blank.md", "  \n\n \t\n")
    binary = _write(tmp_path / "image.txt", bytes(range(256)) * 40)
    latin = _write(tmp_path / "latin.txt", "Le café coûte deux euros. Ça va très bien.".encode("latin-1"))
    summary = ingestor.ingest([tmp_path], show_progress=False)
    reasons = {Path(s.path).name: s.reason for s in summary.skipped}
    assert reasons == {
        "empty.txt": "empty file",
        "blank.md": "empty file (whitespace only)",
        "image.txt": "binary content (NUL bytes) in a text file",
    }
    assert summary.added == [str(latin)]
    (node,) = _chunks_of(ingestor.vector_store, latin)
    assert node.text == "Le café coûte deux euros. Ça va très bien."  # detected: cp1252 (a superset of latin-1's letters)
    assert node.metadata["encoding"] == "cp1252"
    assert {str(empty), str(blank), str(binary)}.isdisjoint(ingestor.sources)


def test_file_that_becomes_unreadable_loses_its_old_chunks_and_says_so(tmp_path, ingestor):
    f = _write(tmp_path / "doc.txt", "First version of the text.")
    ingestor.ingest([f], show_progress=False)
    _write(f, b"\x00\x01binary now")
    summary = ingestor.ingest([f], show_progress=False)
    assert summary.removed == [str(f)] and "binary" in summary.skipped[0].reason
    assert _chunks_of(ingestor.vector_store, f) == []


def test_directory_of_10000_small_files_is_discovered_quickly(tmp_path):
    for i in range(10_000):
        (tmp_path / f"note{i:05d}.txt").write_text(f"Note {i} mentions the page cache.")
    files, skipped = discover([tmp_path])
    assert len(files) == 10_000 and not skipped


@pytest.mark.slow
def test_ingest_directory_of_10000_small_files(tmp_path, ingestor):
    for i in range(10_000):
        (tmp_path / f"note{i:05d}.txt").write_text(f"Note {i} mentions the page cache.")
    summary = ingestor.ingest([tmp_path], show_progress=False)
    assert len(summary.added) == 10_000 and summary.chunks_embedded == 10_000
    again = ingestor.ingest([tmp_path], show_progress=False)
    assert len(again.unchanged) == 10_000 and again.chunks_embedded == 0


_STREAM_SCRIPT = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from transformers import AutoTokenizer
    from ragkit.chunking import TokenChunker
    from ragkit.models import default_embedder_path
    from ragkit.readers import read_parts
    chunker = TokenChunker(AutoTokenizer.from_pretrained(default_embedder_path()), 256)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chunks = chars = 0
    for part in read_parts(Path(sys.argv[1])):
        chunks += len(chunker.split(part.text))
        chars += len(part.text)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(chunks, chars, (peak - base) // 1024)
""")


@pytest.mark.slow
def test_200mb_text_file_is_streamed_with_bounded_memory(tmp_path):
    """Reading + chunking a 200 MB file: peak RSS grows by far less than the file (parts of 1 Mi chars)."""
    para = ("The pager is responsible for reading, writing and caching database pages. " * 6 + "\n\n").encode()
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        for _ in range(200 * 2**20 // len(para) + 1):
            f.write(para)
    out = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, str(big)], capture_output=True, text=True,
                         check=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    chunks, chars, grew_mib = map(int, out.stdout.split())
    assert chars == big.stat().st_size
    # chunks pack whole paragraphs (~80 tokens each) up to 256 tokens: about 3 per chunk (measured 176,406);
    # English text has < 8 characters per token, so a chunk holds < 2,048 characters
    assert big.stat().st_size // 2048 < chunks < big.stat().st_size // len(para)
    assert grew_mib < 150, f"peak RSS grew by {grew_mib} MiB while streaming a 200 MB file"


# ---- deduplicating ingestion ----------------------------------------------------------------------

def test_reingest_unchanged_embeds_nothing_changed_replaces_removed_deletes(tmp_path, ingestor):
    a = _write(tmp_path / "a.txt", "The rollback journal stores original page content. It enables atomic commit.")
    b = _write(tmp_path / "b.txt", "Write-ahead logging appends changes to a WAL file.")
    first = ingestor.ingest([tmp_path], show_progress=False)
    assert sorted(first.added) == [str(a), str(b)] and first.chunks_embedded == 2

    again = ingestor.ingest([tmp_path], show_progress=False)
    assert again.chunks_embedded == 0 and sorted(again.unchanged) == [str(a), str(b)] and not again.changed

    _write(b, "Checkpoints move WAL content back into the database file.")
    changed = ingestor.ingest([tmp_path], show_progress=False)
    assert changed.updated == [str(b)] and changed.unchanged == [str(a)] and changed.chunks_embedded == 1
    (node,) = _chunks_of(ingestor.vector_store, b)
    assert node.text.startswith("Checkpoints")
    assert ingestor.vector_store.node_count == 2, "the old chunk of b was replaced, not kept beside the new one"

    assert ingestor.delete(str(a)) == [str(a)]
    assert _chunks_of(ingestor.vector_store, a) == [] and str(a) not in ingestor.sources
    with pytest.raises(IngestError, match="neither an ingested file nor a document id"):
        ingestor.delete(str(a))


def test_multi_part_file_shrinks_and_stale_parts_go(tmp_path, embedder):
    ingestor = Ingestor(embedder, FaissVectorStore.from_embedder(embedder), part_chars=2_000)
    para = "Each page of the database is {} bytes long in this example.\n\n"
    f = _write(tmp_path / "long.txt", "".join(para.format(i) for i in range(120)))
    ingestor.ingest([f], show_progress=False)
    ids = ingestor.sources[str(f)]
    assert len(ids) > 3 and ids[0] == str(f) and ids[1] == f"{f}#part1"
    chunks = _chunks_of(ingestor.vector_store, f)
    text = f.read_text()
    assert all(text[c.metadata["char_start"] : c.metadata["char_end"]] == c.text for c in chunks)

    _write(f, "".join(para.format(i) for i in range(20)))
    summary = ingestor.ingest([f], show_progress=False)
    assert summary.updated == [str(f)]
    assert len(ingestor.sources[str(f)]) < len(ids)
    assert {c.metadata["part"] for c in _chunks_of(ingestor.vector_store, f)} == set(range(len(ingestor.sources[str(f)])))


def test_documents_can_be_ingested_directly(ingestor):
    doc = Document(id_="note-1", text="Vacuum rebuilds the database file.", metadata={"topic": "vacuum"})
    summary = ingestor.ingest([doc], show_progress=False)
    assert summary.added == ["note-1"]
    (node,) = ingestor.vector_store.get_nodes()
    assert node.metadata["topic"] == "vacuum" and node.ref_doc_id == "note-1"
    assert ingestor.ingest([doc], show_progress=False).chunks_embedded == 0
