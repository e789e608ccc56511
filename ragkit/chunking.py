"""Token-aware chunking with the embedder's own tokenizer.

Each paragraph is tokenized once (fast tokenizer, character offsets); sentences are found with a
regular expression and packed greedily into chunks of at most ``max_tokens`` tokens, special tokens
included, so the encoder never truncates a chunk. A sentence longer than a whole chunk is split at
token boundaries (at a word start where one is near), and the chunk says so in its metadata
(``cut_mid_sentence``). Every chunk is checked again against the tokenizer before it is returned.

Text without whitespace: a WordPiece tokenizer (MiniLM's) reads a "word" of more than
``max_input_chars_per_word`` (100) characters as one unknown token, so a 5 MB line would become a few
huge chunks embedded as ``[UNK]``. A sentence holding such a word is instead cut into pieces of at most
that many characters, packed by their token counts; the chunk's text joins its pieces with spaces
(``char_start``/``char_end`` still give the original range).
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Sequence

from llama_index.core.node_parser.interface import NodeParser
from llama_index.core.schema import BaseNode, Document, NodeRelationship, TextNode
from pydantic import PrivateAttr
from tokenizers import Tokenizer

from ragkit.errors import InvalidSettingError

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
# a sentence ends at . ! ? (closing quotes/brackets allowed) followed by whitespace and not a lowercase letter
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*\s+(?=[^\sa-z])")
MIN_CONTENT_TOKENS = 8  # the smallest chunk worth embedding, special tokens excluded


@dataclass(frozen=True)
class Span:
    """A chunk as a character range of the text it came from."""

    start: int
    end: int
    n_tokens: int  # content tokens, special tokens excluded
    cut_mid_sentence: bool = False
    pieces: tuple[tuple[int, int], ...] = ()  # set for whitespace-free text: character ranges joined by spaces

    def content(self, text: str) -> str:
        """The chunk's text: the range of ``text``, or its pieces joined by spaces."""
        if self.pieces:
            return " ".join(text[a:b] for a, b in self.pieces)
        return text[self.start:self.end]


@dataclass
class _Sentence:
    start: int
    end: int
    tok_lo: int  # token index range inside its paragraph's encoding
    tok_hi: int
    para: int


class TokenChunker:
    """Splits text into :class:`Span` s of at most ``max_tokens`` tokens (special tokens included)."""

    def __init__(self, tokenizer: Any, max_tokens: int, chunk_tokens: int | None = None):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # the Rust tokenizer
        # a private copy without the model's truncation/padding: we must see every token
        self.backend = Tokenizer.from_str(backend.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.n_special = len(self.backend.encode("", add_special_tokens=True).ids)
        self.max_tokens = max_tokens
        smallest = self.n_special + MIN_CONTENT_TOKENS
        size = max_tokens if chunk_tokens is None else chunk_tokens
        if isinstance(size, bool) or not isinstance(size, int) or not smallest <= size <= max_tokens:
            raise InvalidSettingError(
                f"chunk size (--chunk-tokens) {chunk_tokens!r} is out of range: use an integer from {smallest} "
                f"to the embedder's max_seq_length {max_tokens} (longer chunks would be truncated by the encoder), "
                f"or leave it unset for {max_tokens}"
            )
        self.budget = size - self.n_special
        self.max_word_chars: int | None = getattr(self.backend.model, "max_input_chars_per_word", None)
        self._long_word = re.compile(rf"\S{{{self.max_word_chars + 1},}}") if self.max_word_chars else None

    def split_many(self, texts: Sequence[str]) -> list[list[Span]]:
        """Spans of each text; all paragraphs of all texts are tokenized in one batch."""
        paragraphs: list[tuple[int, int, int]] = []  # (text index, start, end)
        for t, text in enumerate(texts):
            pos = 0
            for m in _PARAGRAPH_BREAK.finditer(text):
                paragraphs.append((t, pos, m.start()))
                pos = m.end()
            paragraphs.append((t, pos, len(text)))
        paragraphs = [(t, s, e) for t, s, e in paragraphs if texts[t][s:e].strip()]
        encodings = self.backend.encode_batch(
            [texts[t][s:e] for t, s, e in paragraphs], add_special_tokens=False
        )
        by_text: list[list[int]] = [[] for _ in texts]
        for p, (t, _, _) in enumerate(paragraphs):
            by_text[t].append(p)
        per_text = [self._pack(text, paragraphs, encodings, group) for text, group in zip(texts, by_text)]
        return [self._verified(text, spans) for text, spans in zip(texts, per_text)]

    def split(self, text: str) -> list[Span]:
        """Spans of one text."""
        return self.split_many([text])[0]

    def _pack(self, text: str, paragraphs: list, encodings: list, group: list[int]) -> list[Span]:
        """Greedy packing of the sentences of one text's paragraphs into spans."""
        spans: list[Span] = []
        cur_start = cur_end = -1
        cur_tokens = 0

        def flush() -> None:
            nonlocal cur_start, cur_tokens
            if cur_start >= 0 and cur_tokens:
                spans.append(Span(cur_start, cur_end, cur_tokens))
            cur_start, cur_tokens = -1, 0

        for p in group:
            _, p_start, p_end = paragraphs[p]
            enc = encodings[p]
            starts = [o[0] for o in enc.offsets]
            for sent in self._sentences(text, p_start, p_end, starts, p):
                n = sent.tok_hi - sent.tok_lo
                if n == 0:
                    continue
                if self._long_word is not None and self._long_word.search(text, sent.start, sent.end):
                    flush()
                    spans.extend(self._cut_words(text, sent.start, sent.end))
                    continue
                if n > self.budget:
                    flush()
                    spans.extend(self._cut(text, p_start, enc.offsets, sent))
                    continue
                if cur_tokens + n > self.budget:
                    flush()
                if cur_start < 0:
                    cur_start = sent.start
                cur_end = sent.end
                cur_tokens += n
        flush()
        return spans

    @staticmethod
    def _sentences(text: str, p_start: int, p_end: int, tok_starts: list[int], p: int) -> list[_Sentence]:
        para = text[p_start:p_end]
        bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(para)] + [len(para)]
        out = []
        for lo, hi in zip(bounds, bounds[1:]):
            piece = para[lo:hi]
            lo += len(piece) - len(piece.lstrip())
            end = lo + len(piece.strip())
            if end <= lo:
                continue
            out.append(
                _Sentence(p_start + lo, p_start + end, bisect_left(tok_starts, lo), bisect_left(tok_starts, hi), p)
            )
        return out

    def _cut(self, text: str, p_start: int, offsets: list, sent: _Sentence) -> list[Span]:
        """Splits an over-long sentence at token boundaries, preferring word starts."""
        pieces = []
        lo = sent.tok_lo
        while lo < sent.tok_hi:
            hi = min(lo + self.budget, sent.tok_hi)
            if hi < sent.tok_hi:  # look back for a token that starts a word
                for k in range(hi, max(lo + self.budget // 2, hi - 32), -1):
                    c = p_start + offsets[k][0]
                    if c > 0 and text[c - 1].isspace():
                        hi = k
                        break
            start = p_start + offsets[lo][0] if lo > sent.tok_lo else sent.start
            end = p_start + offsets[hi][0] if hi < sent.tok_hi else sent.end
            piece = text[start:end].rstrip()
            pieces.append(Span(start, start + len(piece), hi - lo, cut_mid_sentence=True))
            lo = hi
        return pieces

    def _cut_words(self, text: str, start: int, end: int) -> list[Span]:
        """Spans of pieces of at most ``max_word_chars`` characters, packed by token count."""
        width = int(self.max_word_chars or 1)
        pieces = [(a, min(a + width, start + m.end())) for m in re.finditer(r"\S+", text[start:end])
                  for a in range(start + m.start(), start + m.end(), width)]
        counts = [len(e.ids) for e in self.backend.encode_batch([text[a:b] for a, b in pieces],
                                                                add_special_tokens=False)]
        spans: list[Span] = []
        group: list[tuple[int, int]] = []
        tokens = 0
        for piece, n in zip(pieces, counts):
            if group and tokens + n > self.budget:
                spans.append(Span(group[0][0], group[-1][1], tokens, True, tuple(group)))
                group, tokens = [], 0
            group.append(piece)
            tokens += n
        if group:
            spans.append(Span(group[0][0], group[-1][1], tokens, True, tuple(group)))
        return spans

    def _verified(self, text: str, spans: list[Span]) -> list[Span]:
        """Re-counts every chunk as the encoder will see it; re-splits any chunk over ``max_tokens``."""
        if not spans:
            return spans
        counts = [len(e.ids) for e in self.backend.encode_batch([s.content(text) for s in spans])]
        out: list[Span] = []
        for span, n in zip(spans, counts):
            if n <= self.max_tokens:
                out.append(span)
            else:  # the tokenizer is not additive across sentence joins: split this chunk in two
                out.extend(self._verified(text, self._halve(text, span)))
        return out

    def _halve(self, text: str, span: Span) -> list[Span]:
        if len(span.pieces) > 1:
            left_p, right_p = span.pieces[: len(span.pieces) // 2], span.pieces[len(span.pieces) // 2:]
            return [Span(left_p[0][0], left_p[-1][1], span.n_tokens // 2, True, left_p),
                    Span(right_p[0][0], right_p[-1][1], span.n_tokens - span.n_tokens // 2, True, right_p)]
        piece = text[span.start : span.end]
        mid = len(piece) // 2
        cut = piece.rfind(" ", 0, mid)
        cut = cut if cut > 0 else mid
        left, right = piece[:cut].rstrip(), piece[cut:].lstrip()
        r_start = span.end - len(right)
        return [
            Span(span.start, span.start + len(left), span.n_tokens // 2, True),
            Span(r_start, span.end, span.n_tokens - span.n_tokens // 2, True),
        ]


class TokenSentenceSplitter(NodeParser):
    """LlamaIndex node parser over :class:`TokenChunker`: one ``TextNode`` per chunk.

    Chunk metadata: the document's (``file_path``, ``file_name``, ``part``) plus ``chunk_index``
    (position in the part), ``char_start``/``char_end`` (offsets in the file's decoded text) and
    ``cut_mid_sentence``. Metadata is excluded from the embedded and LLM text, so the token count
    that was checked is exactly what the encoder reads.
    """

    _chunker: TokenChunker = PrivateAttr()

    def __init__(self, tokenizer: Any, max_tokens: int, chunk_tokens: int | None = None, **kwargs: Any):
        super().__init__(include_prev_next_rel=False, **kwargs)
        self._chunker = TokenChunker(tokenizer, max_tokens, chunk_tokens)

    @classmethod
    def class_name(cls) -> str:
        return "TokenSentenceSplitter"

    @property
    def chunker(self) -> TokenChunker:
        return self._chunker

    def get_nodes_from_documents(
        self, documents: Sequence[Document], show_progress: bool = False, **kwargs: Any
    ) -> list[BaseNode]:
        # the base class would re-find every chunk with str.find; our offsets are already exact
        return self._parse_nodes(documents, show_progress=show_progress)

    def _parse_nodes(self, nodes: Sequence[BaseNode], show_progress: bool = False, **kwargs: Any) -> list[BaseNode]:
        texts = [n.get_content() for n in nodes]
        out: list[BaseNode] = []
        for doc, text, spans in zip(nodes, texts, self._chunker.split_many(texts)):
            base = int(doc.metadata.get("part_char_start", 0))
            doc_meta = {k: v for k, v in doc.metadata.items() if k != "part_char_start"}
            for i, span in enumerate(spans):
                meta = dict(doc_meta, chunk_index=i, char_start=base + span.start, char_end=base + span.end)
                if span.cut_mid_sentence:
                    meta["cut_mid_sentence"] = True
                keys = list(meta)  # metadata is for display and filters, never embedded or shown to the LLM
                chunk = span.content(text)
                out.append(
                    TextNode(
                        id_=_node_id(doc.id_, i, chunk),
                        text=chunk,
                        metadata=meta,
                        excluded_embed_metadata_keys=keys,
                        excluded_llm_metadata_keys=keys,
                        start_char_idx=span.start,
                        end_char_idx=span.end,
                        relationships={NodeRelationship.SOURCE: doc.as_related_node_info()},
                    )
                )
        return out


def _node_id(doc_id: str, index: int, text: str) -> str:
    """Deterministic node id: the same file and text always give the same ids."""
    return hashlib.sha1(f"{doc_id}\x00{index}\x00{text}".encode("utf-8", "surrogatepass")).hexdigest()
