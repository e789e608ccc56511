"""Needle in a haystack: ``python -m evals.needle --lengths 1k,2k,4k``.

At which context lengths and depths does the model (and the retrieval pipeline) stop finding what it
was given? See docs/needle.md for every flag, the scoring, the controls and how to read the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, ClassVar, Hashable, Sequence

from pydantic import ValidationInfo, field_validator, model_validator

from evals.core import answers, scorers
from evals.core import backend as backends  # (the settings field is named backend)
from evals.core.errors import RebuildError, SettingsError, TooLongError, cli_exit
from evals.core.execute import Opened
from evals.core.execute import execute as run_suite
from evals.core.portable import portable_value
from evals.core.rescore import rescore_command
from evals.core.runner import Group, Job
from evals.core.scoring import contains_value
from evals.core.settings import SuiteSettings
from evals.core.spec import Cell, config_hash, load_suite_file, merge_settings, parse_depths, parse_ints, parse_lengths
from evals.core.store import RunDir
from evals.core.targets import Grid, Retriever, load_target, tokenizer_fingerprint
from evals.needle import RECORD
from evals.needle import report
from evals.needle.haystack import (GENRES, STARTS, Built, Codec, Estimator, Frame, Recipe, SentencePool, fit_prompt,
                                   haystack_sets, measure, run_haystack_sets, start_sentence)
from evals.needle.layout import grid, lengths_within
from evals.needle.needles import NEEDLE_TYPES, Needle, make_needle, needle_scores
from evals.needle.token_cache import TOKENS_DIR, CachedCodec
from ragkit.structured import instruction as structured_instruction

SUITE = RECORD.name
MODES = ("context", "rag", "both")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_HAYSTACK = GENRES["docs"]  # relative paths are looked up in the cwd, then the repo


def haystack_paths(paths: Sequence[str]) -> list[Path]:
    """Haystack paths as given; a relative one missing from the cwd is taken from the repository root."""
    return [Path(p) if Path(p).exists() or Path(p).is_absolute() or not (REPO / p).exists() else REPO / p
            for p in paths]


class NeedleSettings(SuiteSettings):
    """Every setting of a needle run; all but the run-control ones go into the configuration hash."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)
    model: str = "default"
    quant: str = "none"
    dtype: str | None = None
    device: str | None = None
    mode: str = "context"
    needle: str = "passcode"
    seeds: tuple[int, ...] = (1,)
    haystack: tuple[str, ...] = DEFAULT_HAYSTACK
    haystack_start: str = "fixed"
    max_new_tokens: int | None = None
    top_k: int = 4
    chunk_size: int = 256
    store: str | None = None  # rag: a postgresql:// vector store instead of FAISS index directories
    controls: bool = True
    # run control (not hashed)
    out: str | None = None
    resume: bool = False
    skip_too_long: bool = False
    progress: bool = True
    threads: int | None = None
    scorer: str = scorers.DEFAULT  # re-runnable from the stored answers (--rescore), so not hashed
    plan: bool = False  # print the projected memory and time of the grid, run nothing
    gpu: str | None = None  # --plan: the GPU to project for (default: the present one)

    RUN_CONTROL: ClassVar[tuple[str, ...]] = ("out", "resume", "skip_too_long", "progress", "device", "threads",
                                              "scorer", "plan", "gpu", *SuiteSettings.RUN_CONTROL)
    LABEL: ClassVar[str] = "needle settings"

    @field_validator("lengths", "depths", "seeds", "haystack", mode="before")
    @classmethod
    def _parse(cls, v: Any, info: ValidationInfo) -> tuple:
        """The flag spellings: "1k,2k", "0,50,100" or a count, "1,2", one haystack set or several (written as :func:`canonical_haystack`)."""
        if info.field_name == "lengths":
            return parse_lengths(v)
        if info.field_name == "depths":
            return parse_depths(v)
        if info.field_name == "seeds":
            return parse_ints(v, "--seeds")
        return canonical_haystack((v,) if isinstance(v, str) else tuple(v))

    @model_validator(mode="after")
    def _check(self) -> NeedleSettings:
        if self.mode not in MODES:
            raise SettingsError(f"--mode {self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.haystack_start not in STARTS:
            raise SettingsError(f"--haystack-start {self.haystack_start!r} is unknown; choose {' or '.join(STARTS)}")
        if self.needle not in NEEDLE_TYPES:
            raise SettingsError(f"--needle {self.needle!r} is unknown; choose one of {', '.join(NEEDLE_TYPES)}")
        text_budget = self.answer_budget(96 if self.needle in ("kv-uuid", "multivalue", "multiquery") else 32)
        if self.answer_format == "json":
            schemas = [make_needle(self.needle, seed).schema for seed in self.seeds]
            self.max_new_tokens = answers.json_budget(text_budget, schemas, self.max_new_tokens)
        elif self.max_new_tokens is None:
            self.max_new_tokens = text_budget
        scorers.check(self.scorer)
        if self.top_k < 1 or self.chunk_size < 32:
            raise SettingsError("--top-k must be >= 1 and --chunk-size >= 32 tokens")
        backends.check(self)
        return self

    @property
    def genres(self) -> dict[str, tuple[str, ...]]:
        """The haystack sets of the run by name (one genre, or several compared side by side)."""
        return haystack_sets(self.haystack)

    def hashed(self) -> dict[str, Any]:
        """As the base class, but ``haystack_start`` only when not ``fixed``: runs made before the setting
        existed (all ``fixed``) keep their configuration hash, so they still resume and compare."""
        d = super().hashed()
        if d["haystack_start"] == "fixed":
            del d["haystack_start"]
        return d


def canonical_haystack(items: Sequence[str] | str) -> tuple[str, ...]:
    """``--haystack`` items written one way: a single set as its paths (what runs made before genres stored,
    so their configuration hash holds), several as genre names or ``name=path,...``."""
    sets = haystack_sets(items)
    if len(sets) == 1:
        return next(iter(sets.values()))
    return tuple(n if GENRES.get(n) == p else f"{n}={','.join(p)}" for n, p in sets.items())


def load_pools(s: NeedleSettings) -> dict[str, SentencePool]:
    """The sentence pool of each haystack set of the run."""
    return {name: SentencePool.from_paths(haystack_paths(paths)) for name, paths in s.genres.items()}


def pool_fingerprint(pools: dict[str, SentencePool]) -> str | dict[str, str]:
    """What the configuration hashes of the haystack text: one fingerprint, or one per genre."""
    prints = {name: p.fingerprint for name, p in pools.items()}
    return next(iter(prints.values())) if len(prints) == 1 else prints


def needle_frame(needle: Needle, answer_format: str) -> Frame:
    """The fixed parts of a needle prompt: for JSON answers the question carries ragkit's JSON-schema instruction
    (so the length budget counts it) and no answer prefix starts the reply."""
    if answer_format == "json":
        return Frame(needle.instruction, f"{needle.question}\n{structured_instruction(needle.schema)}")
    return Frame(needle.instruction, needle.question, needle.answer_prefix)


def build_cell(codec: Codec, pool: SentencePool, est: Estimator, s: NeedleSettings,
               cell: Cell) -> tuple[Needle, Frame, Built]:
    """The needle, frame and fitted haystack prompt of a cell (needle-free for a control: the same haystack,
    which starts where ``s.haystack_start`` says for the cell's seed)."""
    needle = make_needle(s.needle, cell["seed"])
    frame = needle_frame(needle, s.answer_format)
    depth = 50.0 if cell["depth"] is None else cell["depth"]
    built = fit_prompt(codec, pool, frame, needle.sentences, (depth,) + needle.extra_depths, cell["length"],
                       s.max_new_tokens, est, start_sentence(s.haystack_start, cell["seed"], pool))
    if cell["depth"] is None:  # control: the same haystack with the needle sentences removed
        built = measure(codec, pool, frame, needle.sentences,
                        Recipe(built.recipe.pool_ids, [None] * len(needle.sentences)))
    return needle, frame, built


class NeedleSuite:
    """Cells, prompts and scoring of the needle suite (the runner does the rest)."""

    name = SUITE

    def __init__(self, settings: NeedleSettings, target: Any, pools: dict[str, SentencePool], run_dir: RunDir,
                 lengths: dict[str, Sequence[int]]):
        self.s, self.target, self.pools, self.run_dir = settings, target, pools, run_dir
        self.max_new_tokens = settings.max_new_tokens
        self.lengths = lengths
        self.config = config_hash({**settings.hashed(), "pool": pool_fingerprint(pools)})
        self.codec = CachedCodec(target.codec, run_dir.path / TOKENS_DIR, tokenizer_fingerprint(target.llm.tokenizer))
        self.est = {name: Estimator(self.codec, pool) for name, pool in pools.items()}
        self.retriever = Retriever(settings.chunk_size, settings.top_k, settings.store, table_prefix=SUITE)
        self.control_seeds: dict[str, list[int]] = {}  # control cell id -> the seeds whose prompt it is
        self.decodings = answers.decodings(settings.answer_format, settings.constrained)

    def cells(self) -> list[Cell]:
        out = []
        for genre, mode, length in grid(self.s.mode, self.pools, self.lengths):
            for decoding in self.decodings:
                for seed in self.s.seeds:
                    out += [self._cell(mode, length, seed, depth, genre, decoding) for depth in self.s.depths]
                if self.s.controls:
                    out += self._controls(mode, length, genre, decoding)
        return out

    def _controls(self, mode: str, length: int, genre: str, decoding: str | None) -> list[Cell]:
        """One control per distinct no-needle prompt: seeds whose control prompts are the same tokens (a shared
        haystack and the same question) are one generation, so one cell stands for all of them (the first
        seed's, so its id is the one a per-seed run had) and its row lists them in ``control_seeds``."""
        first: dict[tuple[int, ...], Cell] = {}
        for seed in self.s.seeds:
            cell = self._cell(mode, length, seed, None, genre, decoding)
            key = tuple(self.build(cell)[2].ids)
            kept = first.setdefault(key, cell)
            self.control_seeds.setdefault(kept.cell_id, []).append(seed)
        return list(first.values())

    def _cell(self, mode: str, length: int, seed: int, depth: float | None, genre: str,
              decoding: str | None = None) -> Cell:
        coords = {"mode": mode, "length": length, "seed": seed, "depth": depth, "needle": self.s.needle,
                  "kind": "control" if depth is None else "needle"}
        if len(self.pools) > 1:  # a single-genre run keeps the cell ids of runs made before genres
            coords["genre"] = genre
        if decoding is not None:  # JSON answers only: text cells keep their ids
            coords["decoding"] = decoding
        return Cell(SUITE, self.config, coords)

    def genre(self, cell: Cell) -> str:
        return cell.coords.get("genre") or next(iter(self.pools))

    def group_key(self, cell: Cell) -> Hashable:
        # context cells that read one haystack share its prefix: one per length, or per (length, seed) when
        # each seed starts its own; rag cells each read their own chunks
        if cell["mode"] != "context":
            return cell.cell_id
        if self.s.haystack_start == "fixed":
            return ("context", self.genre(cell), cell["length"])
        return ("context", self.genre(cell), cell["length"], cell["seed"])

    def build(self, cell: Cell) -> tuple[Needle, Frame, Built]:
        genre = self.genre(cell)
        return build_cell(self.codec, self.pools[genre], self.est[genre], self.s, cell)

    def prepare(self, cells: Sequence[Cell]) -> Group:
        jobs = [self._job(c) for c in cells]
        base = None
        if cells[0]["mode"] == "context":
            control = self._cell("context", cells[0]["length"], cells[0]["seed"], None, self.genre(cells[0]),
                                 cells[0].coords.get("decoding"))
            base = next((j.ids for j in jobs if j.cell.cell_id == control.cell_id), None)
            base = base if base is not None else self.build(control)[2].ids
        return Group(jobs, base)

    def _job(self, cell: Cell) -> Job:
        needle, frame, built = self.build(cell)
        seeds = self.control_seeds.get(cell.cell_id, [cell["seed"]]) if cell["kind"] == "control" else [cell["seed"]]
        needles = [needle] + [make_needle(self.s.needle, x) for x in seeds if x != cell["seed"]]
        row: dict[str, Any] = {"cell_id": cell.cell_id, "suite": SUITE, "config": self.config, **cell.coords,
                               "expected": list(needle.expected), "question": frame.question,
                               "target_tokens": cell["length"], "max_new_tokens": self.max_new_tokens,
                               "haystack_tokens": built.haystack_span[1] - built.haystack_span[0],
                               "genre": self.genre(cell),
                               "recipe": {**built.recipe.to_json(), "pool": self.pools[self.genre(cell)].fingerprint}}
        if cell["kind"] == "control":
            row.update(control_seeds=seeds)
        else:
            row.update(needle_offset=built.needle_offsets[0], needle_depth_actual=built.depth_percent(0),
                       needle_offsets=built.needle_offsets)
        schema = needle.schema if cell.coords.get("decoding") == answers.GRAMMAR else None
        if self.s.answer_format == "json":
            row.update(answer_format="json")
        if cell["mode"] == "context":
            row.update(prompt_tokens=len(built.ids), actual_tokens=len(built.ids) + self.max_new_tokens)
            return Job(cell, built.ids, row, needles, schema)
        return self._rag_job(cell, needles, frame, built, row, schema)

    def _rag_job(self, cell: Cell, needles: list[Needle], frame: Frame, built: Built, row: dict,
                 schema: dict[str, Any] | None) -> Job:
        needle = needles[0]
        start = built.text.index(frame.instruction) + len(frame.instruction) + 2
        haystack = built.text[start: built.text.rindex("\n\n" + frame.question)]
        index_dir = self.run_dir.path / "rag" / f"{cell['length']}-s{cell['seed']}-{cell.cell_id}"
        chunks = self.retriever.top_chunks(index_dir, haystack, needle.question)
        rank = next((i + 1 for i, c in enumerate(chunks) if needle.sentences[0] in c
                     or contains_value(c, needle.expected[0])), None)
        text = self.codec.render(frame.user("\n\n".join(chunks)), frame.answer_prefix)
        ids = self.codec.encode(text)
        row.update(prompt_tokens=len(ids), actual_tokens=len(ids) + self.max_new_tokens,
                   retrieved=rank is not None if cell["kind"] == "needle" else None,
                   retrieval_rank=rank if cell["kind"] == "needle" else None, chunks=chunks)
        return Job(cell, ids, row, needles, schema)

    def score(self, job: Job, answer: str) -> dict[str, Any]:
        return score_answer(answer, job.payload, self.s.scorer, self.s.answer_format)


def score_answer(answer: str, needles: Sequence[Needle], scorer: str, answer_format: str = "text") -> dict[str, Any]:
    """The row fields a scorer writes for one answer (both verdicts, the chosen one as score/found); a control
    stands for the needles of every seed in its ``control_seeds``. JSON answers also get the format checks
    (parses, valid, only the object) and strict scores the object's fields."""
    json_answer = answer_format == "json"
    return {**(answers.json_checks(answer, needles[0].schema) if json_answer else {}),
            **scorers.record(needle_scores(answer, needles, json_answer), scorer),
            "distractor_answered": any(contains_value(answer, v) for v in needles[0].distractors)}


def rescore_row(row: dict[str, Any], scorer: str, run: dict[str, Any]) -> dict[str, Any]:
    """A stored row's score fields under ``scorer`` (the needles are rebuilt from their type and seeds), and its
    genre as the run's settings name it (rows made before genres, or by a single-set run, get that set's name)."""
    seeds = row.get("control_seeds") or [row["seed"]]
    sets = run_haystack_sets(run)
    genre = row.get("genre") if len(sets) > 1 else next(iter(sets))
    needles = [make_needle(row["needle"], x) for x in seeds]
    return {**score_answer(row["answer"], needles, scorer, row.get("answer_format", "text")), "genre": genre}


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.needle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--lengths", help="total tokens per prompt incl. generation budget: 1k,2k,4k or plain integers (k = 1024)")
    a("--depths", help="needle depths in percent (0,25,50,75,100) or a count N of evenly spaced depths")
    backends.add_model_flags(a)
    a("--mode", choices=MODES, help="context: whole haystack in the prompt; rag: top-k chunks via ragkit.Pipeline; both")
    a("--needle", choices=NEEDLE_TYPES, help="needle type (default passcode)")
    a("--seeds", help="comma list of seeds; each seed is a different needle, and with --haystack-start seed a "
      "different haystack (default 1)")
    a("--haystack", nargs="+", help="the filler: genre names (docs, novels, noise; several = an axis of the run), "
      "NAME=PATH[,PATH] sets, or text files/folders forming one set (default: docs, i.e. corpora/sqlite "
      "corpora/python)")
    a("--haystack-start", choices=STARTS, help="fixed: every seed's haystack starts at the first sentence (default); "
      "seed: each seed starts at its own sentence, so seeds read different text")
    a("--max-new-tokens", type=int, help="generation budget per answer, thinking included (default 32; 96 for "
      "uuid/multi needles; +1024 with --reasoning high)")
    a("--top-k", type=int, help="rag: chunks given to the reader (default 4)")
    a("--chunk-size", type=int, help="rag: chunk size in embedder tokens (default 256)")
    a("--store", help="rag: postgresql://... vector store (pgvector) for the cells' chunks instead of FAISS")
    a("--no-controls", dest="controls", action="store_const", const=False, help="skip the no-needle control cells")
    a("--out", help="run directory (default runs/needle-<UTC time>)")
    a("--resume", action="store_const", const=True, help="continue a killed run in --out without redoing finished cells")
    a("--skip-too-long", action="store_const", const=True, help="skip lengths above the context window with a warning")
    a("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")
    a("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    answers.add_flags(a)
    backends.add_flags(a)
    a("--plan", action="store_const", const=True, help="print the grid's projected peak GPU memory per length and "
      "its wall time on the present GPU (or --gpu), refuse lengths that will not fit, and run nothing")
    a("--gpu", help="--plan: project for this GPU (h200) instead of the present one")
    a("--config", help="YAML suite file (evals/suites/*.yaml); flags given on the command line win")
    a("--rebuild-prompt", nargs=2, metavar=("RUN", "CELL"),
      help="print the exact prompt of cell CELL of run directory RUN (fails if its token count differs)")
    a("--report", metavar="RUN", help="rewrite summary.csv, heatmap.png and report.md of run directory RUN")
    a("--rescore", metavar="RUN", help="re-score the stored answers of run directory RUN with --scorer (no "
      "generation) and rewrite its report; with --out into a new run directory instead of RUN itself")
    a("--scorer", choices=tuple(scorers.SCORERS), help="strict: the answer commits to the value(s), not hedged, "
      "not negated, no other value claimed (default); lenient: the values occur anywhere in the answer")
    return p


def settings_from_args(argv: Sequence[str] | None = None) -> tuple[NeedleSettings | None, argparse.Namespace]:
    args = _parser().parse_args(argv)
    if args.rebuild_prompt or args.report or args.rescore:
        return None, args
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "rebuild_prompt", "report", "rescore")}
    merged = merge_settings(load_suite_file(args.config) if args.config else {}, flags, NeedleSettings.fields())
    if not merged.get("lengths"):
        raise SettingsError("--lengths is required (e.g. --lengths 1k,2k,4k), on the command line or in --config")
    return NeedleSettings(**merged), args


def _usable_lengths(s: NeedleSettings, window: int) -> dict[str, tuple[int, ...]]:
    """Lengths per mode; context lengths above the context window fail (or are skipped with a warning)."""
    too_long = [n for n in s.lengths if n > window]
    if too_long and s.mode != "rag":
        msg = (f"length(s) {', '.join(map(str, too_long))} exceed the model's context window of {window} tokens "
               f"(a length counts the whole prompt plus the generation budget)")
        if not s.skip_too_long:
            raise TooLongError(msg + "; drop them, or pass --skip-too-long to skip them with a warning")
        print(f"warning: {msg}; skipping them in context mode (--skip-too-long)", file=sys.stderr)
    return lengths_within(s.lengths, window)


def execute(s: NeedleSettings, target: Any = None) -> Path:
    """Run (or resume) a needle run; returns its directory. ``target``: an already loaded model (tests)."""
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    pools = load_pools(s)

    def build(opened: Opened) -> tuple[NeedleSuite, dict[str, Any]]:
        lengths = _usable_lengths(s, opened.target.context_window)
        files = {name: portable_value(list(p.files), opened.out) for name, p in pools.items()}
        recorded: dict[str, Any] = {"haystack_files": next(iter(files.values())) if len(files) == 1 else files}
        if s.mode != "rag" and lengths.get("context"):  # --plan's projection, for the report to set beside the run
            recorded["projection"] = _grid(s, lengths["context"]).recorded(opened.target)
        return NeedleSuite(s, opened.target, pools, opened.run_dir, lengths), recorded

    return run_suite(RECORD, s, {"pool": pool_fingerprint(pools)}, build, target)


def _grid(s: NeedleSettings, lengths: Sequence[int]) -> Grid:
    """The context grid of ``s`` at ``lengths``, as ``--plan`` projects it."""
    return Grid(s.model, s.quant, lengths, s.depths, len(s.seeds), s.controls, s.max_new_tokens, s.gpu,
                s.haystack_start == "fixed")


def plan_grid(s: NeedleSettings) -> int:
    """``--plan``: print the grid's projected memory and wall time per length before any work; TooLongError
    (exit 2) naming the lengths that will not fit. Context cells only (rag cells read a few chunks)."""
    if s.gpu is None and s.backend != "local":
        raise SettingsError("--plan projects the in-process backend's GPU; a server's memory is its own")
    text, refused = _grid(s, s.lengths).text()
    print(f"needle grid: {len(s.lengths)} lengths x {len(s.depths)} depths x {len(s.seeds)} seeds"
          f"{' + controls' if s.controls else ''}, {s.max_new_tokens} new tokens per cell, model {s.model} "
          f"(quant {s.quant})")
    sys.stdout.write(text)
    if refused:
        raise TooLongError(f"length(s) {', '.join(map(str, refused))} will not fit on one GPU (the reason is "
                           "above); drop them or quantize (--quant nf4)")
    return 0


def rebuild_prompt(run: str, cell_id: str) -> str:
    """The exact prompt of a finished cell, rebuilt from its recipe; RebuildError if tokens differ."""
    run_dir = RunDir(run)
    meta = run_dir.read_run()
    row = next((r for r in run_dir.rows() if r["cell_id"] == cell_id), None)
    if row is None:
        raise RebuildError(f"run {run} has no finished cell {cell_id!r}; cell ids are in {run_dir.results_path}")
    st = meta["settings"]
    sets = haystack_sets(st["haystack"])
    paths = sets.get(row.get("genre"), next(iter(sets.values())))
    pool = SentencePool.from_paths(haystack_paths(paths))
    if pool.fingerprint != row["recipe"]["pool"]:
        raise RebuildError(f"the haystack files {list(paths)} changed since the run (fingerprint "
                           f"{pool.fingerprint} != {row['recipe']['pool']}); the prompt cannot be rebuilt exactly")
    target = load_target(st["model"], st["quant"], st["dtype"], None, st["max_new_tokens"],
                         reasoning_effort=st.get("reasoning"))
    needle = make_needle(row["needle"], row["seed"])
    frame = needle_frame(needle, st.get("answer_format", "text"))
    if row["mode"] == "rag":
        text = target.codec.render(frame.user("\n\n".join(row["chunks"])), frame.answer_prefix)
        ids = target.codec.encode(text)
    else:
        built = measure(target.codec, pool, frame, needle.sentences, Recipe.from_json(row["recipe"]))
        text, ids = built.text, built.ids
    if len(ids) != row["prompt_tokens"]:
        raise RebuildError(f"cell {cell_id} rebuilt to {len(ids)} tokens but the run recorded {row['prompt_tokens']}; "
                           "the tokenizer, template or code changed since the run")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    return cli_exit(lambda: _command(argv))


def _command(argv: Sequence[str] | None) -> int:
    settings, args = settings_from_args(argv)
    if args.report:
        report.write_needle_report(RunDir(args.report))
        print(f"report: {Path(args.report) / 'report.md'}")
        return 0
    if args.rescore:
        rescore_command(RECORD, args.rescore, args.scorer, args.out)
        return 0
    if settings is None:
        sys.stdout.write(rebuild_prompt(*args.rebuild_prompt))
        return 0
    if settings.plan:
        return plan_grid(settings)
    execute(settings)
    return 0

