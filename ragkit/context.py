"""Context assembly: retrieved chunks -> one prompt that fits the LLM's context window.

Tokens are counted with the LLM's own counter on the full chat-templated prompt. The answer budget
(``reserve_tokens``) is kept free; when the chunks do not all fit, the lowest-ranked chunks are
dropped whole (a chunk is never cut) and reported in :attr:`AssembledContext.dropped`.

The order of the kept chunks in the prompt is a named strategy from :data:`ORDERINGS`, which the
lost-in-the-middle evaluation compares:

- ``"score"``: best first.
- ``"reverse"``: best last, nearest to the question.
- ``"long_context_reorder"``: best at both ends, weakest in the middle (LlamaIndex's ``LongContextReorder``).
- ``"document"``: source order (file, part, position in the file).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.schema import NodeWithScore

from ragkit.errors import ContextWindowExceededError, InvalidArgumentError

QA_TEMPLATE = (
    "Answer the question using only the context below. If the context does not contain the answer, "
    "say that you do not know.\n\n"
    "Context:\n{context}\n\n"
    "Question: {question}\nAnswer:"
)

# Chunks are laid out as "[n] file (chunk k)"; a small model tends to continue that layout after its
# answer, so generation stops where a new "[n]" line would begin.
STOP_SEQUENCES = ("\n[",)


class TokenCounter(Protocol):
    """What context assembly needs from an LLM (``LocalLLM`` provides it)."""

    def count_tokens(self, text_or_messages: str | list[ChatMessage]) -> int: ...


def _score(n: NodeWithScore) -> float:
    return float(n.score) if n.score is not None else float("-inf")


def order_by_score(nodes: Sequence[NodeWithScore]) -> list[NodeWithScore]:
    """Best first."""
    return sorted(nodes, key=_score, reverse=True)


def order_reverse(nodes: Sequence[NodeWithScore]) -> list[NodeWithScore]:
    """Best last, i.e. nearest to the question that follows the context."""
    return order_by_score(nodes)[::-1]


def order_long_context(nodes: Sequence[NodeWithScore]) -> list[NodeWithScore]:
    """Best at both ends, weakest in the middle: LlamaIndex's ``LongContextReorder`` itself (the weakest chunk
    goes in first, then each next one alternately at the end and the start; with 4 chunks ranks 2, 4, 3, 1)."""
    from llama_index.core.postprocessor import LongContextReorder

    return LongContextReorder().postprocess_nodes(list(nodes))


def order_document(nodes: Sequence[NodeWithScore]) -> list[NodeWithScore]:
    """Source order: by file, then part, then position in the file."""

    def key(n: NodeWithScore) -> tuple[str, int, int]:
        meta = n.node.metadata
        return (str(meta.get("file_path", n.node.ref_doc_id or "")), int(meta.get("part", 0)),
                int(meta.get("char_start", meta.get("chunk_index", 0))))

    return sorted(nodes, key=key)


ORDERINGS: dict[str, Callable[[Sequence[NodeWithScore]], list[NodeWithScore]]] = {
    "score": order_by_score,
    "reverse": order_reverse,
    "long_context_reorder": order_long_context,
    "document": order_document,
}


def get_ordering(name: str) -> Callable[[Sequence[NodeWithScore]], list[NodeWithScore]]:
    """The ordering strategy called ``name``; :class:`InvalidArgumentError` lists the known ones."""
    try:
        return ORDERINGS[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown ordering {name!r}; choose one of {', '.join(ORDERINGS)}") from None


def chunk_label(name: str, part: int, chunk: Any) -> str:
    """The one spelling of where a chunk comes from: ``name (chunk N)``, or ``name (part P, chunk N)``."""
    return f"{name} (part {part}, chunk {chunk})" if part else f"{name} (chunk {chunk})"


def source_label(node: Any) -> str:
    """Short human label of a chunk's origin: ``file_name (chunk N)``."""
    meta = node.metadata
    name = meta.get("file_name") or meta.get("file_path") or node.ref_doc_id or node.node_id
    return chunk_label(name, int(meta.get("part", 0)), meta.get("chunk_index", "?"))


def render_chunk(index: int, node: NodeWithScore) -> str:
    """One chunk as it appears in the prompt."""
    return f"[{index}] {source_label(node.node)}\n{node.node.get_content().strip()}"


@dataclass
class AssembledContext:
    """The prompt, the chunks in it (prompt order) and the ones that did not fit (best first)."""

    prompt: str
    messages: list[ChatMessage]
    nodes: list[NodeWithScore]
    dropped: list[NodeWithScore] = field(default_factory=list)
    prompt_tokens: int = 0
    ordering: str = "score"


def assemble_context(
    nodes: Sequence[NodeWithScore],
    question: str,
    *,
    counter: TokenCounter,
    context_window: int,
    reserve_tokens: int,
    ordering: str = "score",
    template: str = QA_TEMPLATE,
) -> AssembledContext:
    """Fit the best chunks into ``context_window - reserve_tokens`` tokens of chat prompt.

    Raises :class:`ContextWindowExceededError` when not even the question fits without any chunk.
    """
    order = get_ordering(ordering)
    budget = context_window - reserve_tokens
    ranked = order_by_score(nodes)

    def build(kept: Sequence[NodeWithScore]) -> tuple[str, list[ChatMessage], int]:
        ordered = order(kept)
        context = "\n\n".join(render_chunk(i + 1, n) for i, n in enumerate(ordered))
        prompt = template.format(context=context, question=question)
        messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
        return prompt, messages, counter.count_tokens(messages)

    _, _, base = build([])
    if base > budget:
        raise ContextWindowExceededError(base, context_window, reserve_tokens, what="question and instructions")
    # first guess from per-chunk counts (+2 for the blank line between chunks), then check exactly
    kept: list[NodeWithScore] = []
    used = base
    for n in ranked:
        cost = counter.count_tokens(render_chunk(len(kept) + 1, n)) + 2
        if used + cost > budget:
            break  # keep rank order: never skip a better chunk to fit a worse one
        kept.append(n)
        used += cost
    prompt, messages, total = build(kept)
    while total > budget and kept:
        kept.pop()  # the lowest-ranked chunk kept so far
        prompt, messages, total = build(kept)
    return AssembledContext(prompt, messages, order(kept), ranked[len(kept):], total, ordering)
