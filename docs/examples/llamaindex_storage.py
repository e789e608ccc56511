"""LlamaIndex-native use of ragkit's store: build a VectorStoreIndex, persist it with StorageContext,
reload it with load_index_from_storage, and query it. Run: python docs/examples/llamaindex_storage.py DIR

Chunks come from ragkit's TokenSentenceSplitter sized to the embedder (LlamaIndex's default splitter
makes 1024-token nodes, which a 256-token embedder would silently truncate).
"""

from __future__ import annotations

import sys
from pathlib import Path

from llama_index.core import Document, StorageContext, VectorStoreIndex, load_index_from_storage

from ragkit.chunking import TokenSentenceSplitter
from ragkit.embed import SentenceTransformerEmbedding
from ragkit.store import FaissVectorStore


def main(persist_dir: Path) -> list[str]:
    embedder = SentenceTransformerEmbedding("default")
    splitter = TokenSentenceSplitter(embedder.tokenizer, embedder.max_seq_length)
    documents = [Document(text="A hot journal is a rollback journal that needs to be played back.", id_="journal"),
                 Document(text="VACUUM rebuilds the database file, repacking it into a minimal amount of space.",
                          id_="vacuum")]
    storage = StorageContext.from_defaults(vector_store=FaissVectorStore.from_embedder(embedder))
    VectorStoreIndex.from_documents(documents, storage_context=storage, embed_model=embedder,
                                    transformations=[splitter])
    storage.persist(persist_dir=str(persist_dir))

    reloaded = StorageContext.from_defaults(persist_dir=str(persist_dir),
                                            vector_store=FaissVectorStore.from_persist_dir(str(persist_dir)))
    index = load_index_from_storage(reloaded, embed_model=embedder)
    hits = index.as_retriever(similarity_top_k=1).retrieve("What is a hot journal?")
    return [h.node.ref_doc_id for h in hits]


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
