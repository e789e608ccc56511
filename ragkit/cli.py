"""The ``ragkit`` command line. Each command parses its arguments and calls the library."""

from __future__ import annotations

import logging
import os
import sys

import typer

from ragkit.loading import QUANTIZATIONS

app = typer.Typer(
    name="ragkit",
    help="Offline retrieval-augmented generation over local, quantized LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _commands() -> None:
    """Offline retrieval-augmented generation over local, quantized LLMs."""
    import warnings

    _ragkit_log(logging.WARNING)  # e.g. "waiting for the lock held by ..."
    warnings.formatwarning = lambda message, category, *_args, **_kw: f"warning: {message}\n"


def _ragkit_log(level: int) -> None:
    """ragkit's own log lines (and only those) on stderr, from ``level`` up."""
    logger = logging.getLogger("ragkit")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


@app.command("plan")
def plan_command(
    model: str = typer.Argument(..., help="Model directory, config.json, .gguf file, cached hub id, or 'default'."),
    context: str = typer.Option(None, "--context", help="Tokens of KV cache to plan for, e.g. 262144 or 256k "
                                "[default: the model's maximum]."),
    quant: str = typer.Option("nf4", "--quant", help=f"{', '.join(QUANTIZATIONS)} or none."),
    gpus: str = typer.Option(None, "--gpus", help="GPUs to split over, e.g. 3x24GiB or 80GiB,24GiB."),
    headroom: float = typer.Option(0.12, "--headroom", help="Fraction of each GPU kept free."),
    batch: int = typer.Option(1, "--batch", help="Sequences decoded at once."),
    moe_experts: str = typer.Option("ragkit", "--moe-experts", help="ragkit (expert-aware NF4) or stock bitsandbytes."),
    gpu: str = typer.Option(None, "--gpu", help="Also project one prompt of --context tokens on this GPU (h200); "
                            "with --project and no --gpu: the GPU present."),
    project: bool = typer.Option(False, "--project", help="Project peak memory and time on the present GPU."),
) -> None:
    """Plan memory: weights per precision, KV cache per token, and a per-GPU max_memory split; with --gpu or
    --project, also the projected peak memory and time of one prompt of --context tokens on one GPU."""
    from ragkit import projection
    from ragkit.errors import RagkitError
    from ragkit.placement import load_config
    from ragkit.planner import plan

    try:
        tokens = None if context is None else projection.parse_tokens(context)
        result = plan(model, context=tokens, quant=quant, gpus=gpus, headroom=headroom, batch=batch,
                      moe_experts=moe_experts)
        if gpu or project:
            name = projection.resolve_gpu(gpu)
            rows = projection.project_grid(result, load_config(model)[0], [result.context], (), 1, True, 32, name,
                                           batch_size=1)  # one prompt, decoded on its own cache
    except RagkitError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(result.table(), nl=False)
    if gpu or project:
        typer.echo(projection.table(rows, name, result.quant), nl=False)
        if not rows[0].fits:
            raise typer.Exit(2)


@app.command("generate")
def generate_command(
    prompt: str = typer.Argument(..., help="The user message to answer."),
    model: str = typer.Option("default", "--model", help="'default' (SmolLM2-135M-Instruct), a directory, a .gguf file or a cached hub id."),
    quant: str = typer.Option("none", "--quant", help=f"none, {' or '.join(QUANTIZATIONS)} (bitsandbytes)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Answer budget in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (deterministic)."),
) -> None:
    """Answer one prompt with the local LLM, streaming the text as it is generated."""
    import time

    _ragkit_log(logging.INFO)  # says when a GGUF is converted (slow, once)
    from ragkit.errors import RagkitError
    from ragkit.llm import LocalLLM

    _quiet_model_loading()
    try:
        start = time.perf_counter()
        llm = LocalLLM(model, quantization=None if quant == "none" else quant, temperature=temperature)
        loaded = time.perf_counter()
        text = ""
        for chunk in llm.stream_complete(prompt, max_new_tokens=max_new_tokens):
            typer.echo(chunk.delta or "", nl=False)
            text = chunk.text
    except RagkitError as exc:
        raise _fail(exc) from None
    typer.echo("")
    typer.echo(
        f"({llm.model_name}: loaded in {loaded - start:.1f} s, {llm.count_tokens(text)} tokens in "
        f"{time.perf_counter() - loaded:.1f} s)",
        err=True,
    )


@app.command("finetune")
def finetune_command(
    data: str = typer.Argument(..., help="JSONL of chat examples: one {\"messages\": [{role, content}, ...]} per line."),
    out: str = typer.Option(..., "--out", help="Run directory: checkpoints/, losses.jsonl, summary.json, adapter/."),
    model: str = typer.Option("default", "--model", help="Base model: 'default' (SmolLM2-135M-Instruct), a directory, a .gguf file or a cached hub id."),
    quant: str = typer.Option("nf4", "--quant", help="nf4 (QLoRA) or none."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 or float32: compute dtype (nf4) or weights dtype (none)."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank r."),
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (updates scale by alpha / r)."),
    dropout: float = typer.Option(0.05, "--dropout", help="LoRA dropout."),
    targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj", "--targets", help="Comma list of linear modules to adapt."),
    lr: float = typer.Option(2e-4, "--lr", help="Peak learning rate (linear warm-up, then linear decay)."),
    warmup: int = typer.Option(10, "--warmup", help="Warm-up steps."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the training split (unless --max-steps)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    batch_size: int = typer.Option(4, "--batch-size", help="Examples per step."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Tokens kept per example."),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="Held-out share of the examples."),
    eval_every: int = typer.Option(50, "--eval-every", help="Score the held-out split every N steps (and at the end)."),
    save_every: int = typer.Option(25, "--save-every", help="Checkpoint every N steps (and at the end)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the data order, the LoRA init and dropout."),
    device: str = typer.Option(None, "--device", help="cpu or cuda [default: cuda when present]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar with loss and tokens/s."),
) -> None:
    """Train a LoRA adapter (QLoRA on the NF4 base) on chat examples; loss on assistant tokens only."""
    from ragkit.errors import RagkitError
    from ragkit.finetune import finetune, settings

    _quiet_model_loading()
    try:
        s = settings(data=data, out=out, model=model, quant=quant, dtype=dtype, rank=rank, alpha=alpha,
                     dropout=dropout, targets=[t.strip() for t in targets.split(",") if t.strip()], lr=lr,
                     warmup=warmup, epochs=epochs, max_steps=max_steps, batch_size=batch_size, max_tokens=max_tokens,
                     eval_fraction=eval_fraction, eval_every=eval_every, save_every=save_every, seed=seed,
                     device=device, resume=resume, progress=progress)
        adapter = finetune(s)
    except RagkitError as exc:
        raise _fail(exc) from None
    typer.echo(f"adapter: {adapter} (load it with LocalLLM(..., adapter=...) or --adapter)")


# ---- ingest / query / retrieve / info / delete -------------------------------------------------------

INDEX_HELP = ("Index directory (created by ingest; a crash-safe snapshot directory), or --store "
              "postgresql://USER@HOST:PORT/DB?table=NAME&index=exact|hnsw (pgvector; see docs/store.md).")


def _fail(exc: Exception) -> typer.Exit:
    """Print a ragkit error as one ``Error:`` line (no traceback) and return the exit (2) to raise."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(2)


def _quiet_model_loading() -> None:
    """No transformers progress bars or info lines; through the environment while transformers is not
    imported yet (importing it costs a second that ``retrieve`` on the default embedder does not need)."""
    if "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _open(index: str, *, must_exist: bool, **kwargs):  # type: ignore[no-untyped-def]
    from ragkit.store.url import is_store_url

    if must_exist and not is_store_url(index):
        from ragkit.store.index_dir import IndexDirectory

        IndexDirectory(index).require()  # a missing index is reported before seconds of imports
    from ragkit.pipeline import Pipeline

    _quiet_model_loading()
    if is_store_url(index):  # a server-backed store keeps its state itself; an empty one says so at retrieve
        return Pipeline(vector_store=index, **kwargs)
    return Pipeline.load(index, **kwargs) if must_exist else Pipeline(index, **kwargs)


@app.command("ingest")
def ingest_command(
    paths: list[str] = typer.Argument(..., help="Files or directories (.txt .md .html .pdf; others are skipped)."),
    index: str = typer.Option(..., "--index", "--store", help=INDEX_HELP),
    force: bool = typer.Option(False, "--force", help="Replace a corrupt index, or one built by another embedder or chunk size."),
    embed_model: str = typer.Option(None, "--embed-model", help="Embedder: 'default' (all-MiniLM-L6-v2) or a local model directory [default: the index's own; 'default' for a new index]."),
    chunk_tokens: int = typer.Option(None, "--chunk-tokens", help="Tokens per chunk, special tokens included [default: the index's; for a new index the embedder's max_seq_length]."),
    sync: bool = typer.Option(True, "--sync/--no-sync", help="Delete files indexed earlier under a given directory that are gone from it."),
    lock_timeout: float = typer.Option(0.0, "--lock-timeout", help="Seconds to wait for another writer of the index."),
    commit_seconds: float = typer.Option(60.0, "--commit-seconds", help="Commit what is embedded every this many seconds, so a killed ingest resumes there."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Add, update and (with --sync) remove documents in an index; unchanged files are not embedded again."""
    from ragkit.errors import RagkitError

    from ragkit.readers import discover

    try:
        discover(paths)  # a missing path or a symlink loop fails here, before any model is loaded
        pipeline = _open(index, must_exist=False, force=force, embed_model=embed_model, chunk_tokens=chunk_tokens,
                         lock_timeout=lock_timeout, commit_seconds=commit_seconds)
        summary = pipeline.ingest(paths, show_progress=not quiet, sync=sync)
    except RagkitError as exc:
        raise _fail(exc) from None
    typer.echo(str(summary))
    from ragkit.store.url import redact_url

    typer.echo(f"index {redact_url(index)}: {pipeline.info()['chunks']} chunks from {len(pipeline.ingestor.sources)} files")


@app.command("query")
def query_command(
    question: str = typer.Argument(..., help="The question to answer from the index."),
    index: str = typer.Option(..., "--index", "--store", help=INDEX_HELP),
    top_k: int = typer.Option(5, "--top-k", help="Chunks to retrieve."),
    show_sources: bool = typer.Option(False, "--show-sources", help="List the chunks the answer was built from."),
    llm: str = typer.Option("default", "--llm", help="LLM: 'default' (SmolLM2-135M-Instruct), a directory, a .gguf file or a cached hub id."),
    ordering: str = typer.Option("score", "--ordering", help="Chunk order in the prompt: score, reverse, long_context_reorder, document."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Answer budget in tokens."),
) -> None:
    """Answer a question with the local LLM from the index's most relevant chunks."""
    from ragkit.store.url import redact_url

    typer.echo(f"opening the index {redact_url(index)}", err=True)  # within a second: the imports below take longer
    _ragkit_log(logging.INFO)  # then each step: embedder, retrieval, LLM load, generation
    from ragkit.errors import RagkitError

    try:
        pipeline = _open(index, must_exist=True, llm=llm, top_k=top_k, ordering=ordering, max_new_tokens=max_new_tokens)
        answer = pipeline.query(question)
    except RagkitError as exc:
        raise _fail(exc) from None
    typer.echo(answer.text)
    if show_sources:
        from ragkit.context import chunk_label

        typer.echo("\nSources:")
        for i, s in enumerate(answer.sources, 1):
            typer.echo(f"  [{i}] {chunk_label(s.file, s.part, s.position)}  score {s.score:.3f}")
        typer.echo(f"\n({answer.prompt_tokens} prompt tokens, {answer.completion_tokens} completion tokens)")
    if answer.dropped:
        typer.echo(f"note: {len(answer.dropped)} retrieved chunk(s) did not fit the LLM's context window and were left out",
                   err=True)


@app.command("retrieve")
def retrieve_command(
    query: str = typer.Argument(..., help="Text to search for."),
    index: str = typer.Option(..., "--index", "--store", help=INDEX_HELP),
    top_k: int = typer.Option(5, "--top-k", help="Chunks to return."),
    full: bool = typer.Option(False, "--full", help="Print whole chunks instead of their first 200 characters."),
) -> None:
    """Show the chunks most similar to a query (no LLM), best first."""
    from ragkit.errors import RagkitError

    try:
        results = _open(index, must_exist=True).retrieve(query, top_k=top_k)
    except RagkitError as exc:
        raise _fail(exc) from None
    from ragkit.context import chunk_label

    for i, n in enumerate(results, 1):
        meta = n.node.metadata
        text = n.node.get_content().strip()
        text = text if full or len(text) <= 200 else text[:200] + "..."
        where = chunk_label(meta.get("file_path", n.node.ref_doc_id), int(meta.get("part", 0)), meta.get("chunk_index"))
        typer.echo(f"[{i}] score {n.score:.3f}  {where}")
        typer.echo("    " + text.replace("\n", "\n    "))


@app.command("info")
def info_command(
    index: str = typer.Option(..., "--index", "--store", help=INDEX_HELP),
    files: bool = typer.Option(False, "--files", help="List every ingested file."),
) -> None:
    """Describe an index: embedder, chunk size, counts, snapshot (loads no model)."""
    from ragkit.errors import RagkitError
    from ragkit.index_info import describe
    from ragkit.store.url import is_store_url

    try:
        info = _open(index, must_exist=True).info() if is_store_url(index) else describe(index)
    except RagkitError as exc:
        raise _fail(exc) from None
    listed = info.pop("files")
    for key, value in info.items():
        typer.echo(f"{key:15} {value}")
    if files:
        typer.echo("files:")
        for f in listed:
            typer.echo(f"  {f}")


@app.command("delete")
def delete_command(
    target: str = typer.Argument(..., help="An ingested file's path, or a document id (see `ragkit info --files`)."),
    index: str = typer.Option(..., "--index", "--store", help=INDEX_HELP),
    lock_timeout: float = typer.Option(0.0, "--lock-timeout", help="Seconds to wait for another writer of the index."),
) -> None:
    """Remove a file's (or one document's) chunks from the index."""
    from ragkit.errors import RagkitError

    try:
        pipeline = _open(index, must_exist=True, lock_timeout=lock_timeout)
        deleted = pipeline.delete(target)
    except RagkitError as exc:
        raise _fail(exc) from None
    typer.echo(f"deleted {len(deleted)} document(s) of {target}; {pipeline.info()['chunks']} chunks left")


def main() -> None:
    """Entry point of the ``ragkit`` console script."""
    app()


if __name__ == "__main__":
    main()
