"""Lost in the middle: ``python -m evals.lost_in_middle``.

How does answer accuracy depend on where the relevant document sits among many (Liu et al., "Lost in the
Middle", TACL 2024)? Multi-document QA with the gold passage moved across k positions among hard-negative
distractors, closed-book and oracle controls, synthetic key-value retrieval, and the same questions through
ragkit's retrieval pipeline with each of its chunk-ordering strategies. See docs/lost_in_middle.md.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any, ClassVar, Hashable, Sequence

from pydantic import ValidationInfo, field_validator, model_validator

from evals.core import answers, scorers
from evals.core import backend as backends  # (the settings field is named backend)
from evals.core.errors import SettingsError, TooLongError, cli_exit
from evals.core.execute import Opened
from evals.core.execute import execute as run_suite
from evals.core.portable import portable_path
from evals.core.rescore import rescore_command
from evals.core.runner import Group, Job
from evals.core.scoring import answer_match
from evals.core.settings import SuiteSettings
from evals.core.spec import Cell, load_suite_file, merge_settings, parse_ints
from evals.core.targets import CorpusRAG, Target, cache_dir, load_embedder, orderings
from evals.lost_in_middle import RECORD
from evals.lost_in_middle.kv import KVObject, kv_user_text, make_kv
from evals.lost_in_middle.passages import (DISTRACTORS, Distractors, PassagePool, QAItem, load_qa, place_gold,
                                           qa_scores, select_questions)
from ragkit.structured import instruction as structured_instruction

SUITE = RECORD.name
TASKS = ("qa", "kv", "both")
REPO = Path(__file__).resolve().parents[2]
QA_INSTRUCTION = ("Write a high-quality answer for the given question using only the provided search results "
                  "(some of which might be irrelevant).")
CLOSED_BOOK_INSTRUCTION = "Write a high-quality answer for the given question."
GOLD = -1  # the gold passage's id in a prompt recipe (distractors are pool ids)
# --answer-format json: the answer object of QA (and RAG) cells and of key-value cells, and its field
SCHEMAS = {"qa": answers.object_schema({"answer": answers.bounded_string(answers.ASCII_TEXT, 64)}),
           "kv": answers.object_schema({"value": answers.UUID_STRING})}
FIELDS = {"qa": "answer", "kv": "value"}


def qa_user_text(question: str, docs: Sequence[str], answer_instruction: str = "") -> str:
    """The user message of multi-document QA (the paper's template); no documents = closed-book.
    ``answer_instruction``: how to answer (e.g. as a JSON object), in place of the "Answer:" cue."""
    ask = f"Question: {question}\n{answer_instruction or 'Answer:'}"
    if not docs:
        return f"{CLOSED_BOOK_INSTRUCTION}\n\n{ask}"
    body = "\n".join(f"Document [{i + 1}] {' '.join(d.split())}" for i, d in enumerate(docs))
    return f"{QA_INSTRUCTION}\n\n{body}\n\n{ask}"


def answer_schema(task: str) -> dict[str, Any]:
    """The JSON answer schema of a cell's task (rag cells answer as QA ones do)."""
    return SCHEMAS["kv" if task == "kv" else "qa"]


def parse_positions(spec: str | int | Sequence[Any], k: int) -> tuple[int, ...]:
    """Gold positions (0-based) among ``k`` documents: 'all', or a comma list of first, middle, last, integers."""
    items = [str(x).strip().lower() for x in (spec if isinstance(spec, (list, tuple)) else str(spec).split(","))]
    out: set[int] = set()
    for x in filter(None, items):
        if x == "all":
            out.update(range(k))
        elif x in ("first", "middle", "last"):
            out.add({"first": 0, "middle": (k - 1) // 2, "last": k - 1}[x])
        elif x.lstrip("-").isdigit():
            if not 0 <= int(x) < k:
                raise SettingsError(f"--positions {x}: a gold position must be 0..{k - 1} for {k} documents "
                                    "(0-based); use first, middle, last or all to fit every --docs")
            out.add(int(x))
        else:
            raise SettingsError(f"--positions {x!r} is unknown; use all, first, middle, last or 0-based integers")
    if not out:
        raise SettingsError("--positions is empty; use e.g. first,middle,last or all")
    return tuple(sorted(out))


def _repo_path(p: str) -> Path:
    """A relative path missing from the cwd is taken from the repository root."""
    path = Path(p)
    return path if path.exists() or path.is_absolute() or not (REPO / p).exists() else REPO / p


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class LitmSettings(SuiteSettings):
    """Every setting of a lost-in-the-middle run; all but the run-control ones go into the configuration hash."""

    task: str = "both"
    docs: tuple[int, ...] = (10, 20)
    positions: str = "first,middle,last"
    kv_pairs: tuple[int, ...] = (25, 50)
    distractors: str = "hard"
    orderings: tuple[str, ...] | str = "all"
    questions: int = 10
    seeds: tuple[int, ...] = (1,)
    model: str = "default"
    quant: str = "none"
    dtype: str | None = None
    device: str | None = None
    rag_top_k: int = 10
    chunk_tokens: int = 128
    controls: bool = True
    max_new_tokens: int | None = None
    qa_file: str = "corpora/qa/qa.jsonl"
    corpus: tuple[str, ...] = ("corpora/sqlite", "corpora/python")
    store: str | None = None  # orderings: a postgresql:// vector store for the corpus chunks instead of FAISS
    # run control (not hashed)
    out: str | None = None
    resume: bool = False
    progress: bool = True
    cache_dir: str | None = None
    scorer: str = scorers.DEFAULT  # re-runnable from the stored answers (--rescore), so not hashed

    RUN_CONTROL: ClassVar[tuple[str, ...]] = ("out", "resume", "progress", "cache_dir", "device", "scorer",
                                              *SuiteSettings.RUN_CONTROL)
    LABEL: ClassVar[str] = "lost_in_middle settings"

    @field_validator("docs", "kv_pairs", "seeds", "positions", "corpus", mode="before")
    @classmethod
    def _parse(cls, v: Any, info: ValidationInfo) -> Any:
        """The flag spellings: "10,20" (docs and kv pairs sorted, once each), a list of positions, one path."""
        name = info.field_name
        if name in ("docs", "kv_pairs"):
            return tuple(sorted(set(parse_ints(v, "--" + name.replace("_", "-")))))
        if name == "seeds":
            return parse_ints(v, "--seeds")
        if name == "positions":
            return ",".join(str(x).strip() for x in v) if isinstance(v, (list, tuple)) else str(v)
        return tuple(str(Path(p)) for p in ((v,) if isinstance(v, str) else v))

    @model_validator(mode="after")
    def _check(self) -> LitmSettings:
        if self.task not in TASKS:
            raise SettingsError(f"--task {self.task!r} is unknown; choose one of {', '.join(TASKS)}")
        if self.distractors not in DISTRACTORS:
            raise SettingsError(f"--distractors {self.distractors!r} is unknown; choose {' or '.join(DISTRACTORS)}")
        if min(self.docs) < 2 or min(self.kv_pairs) < 2:
            raise SettingsError("--docs and --kv-pairs need at least 2 (one gold and one distractor)")
        for k in (self.docs if self.qa else ()) + (self.kv_pairs if self.kv else ()):
            parse_positions(self.positions, k)
        known = orderings()
        names = [str(x).strip() for x in (self.orderings if isinstance(self.orderings, (list, tuple))
                                          else str(self.orderings).split(",")) if str(x).strip()]
        names = list(known) if names == ["all"] else [] if names == ["none"] else names
        bad = [o for o in names if o not in known]
        if bad:
            raise SettingsError(f"--orderings {','.join(bad)} unknown; ragkit offers {', '.join(known)} "
                                "(or all, or none)")
        self.orderings = tuple(dict.fromkeys(names))
        if self.questions < 1 or self.rag_top_k < 1 or self.chunk_tokens < 32:
            raise SettingsError("--questions and --rag-top-k must be >= 1, --chunk-tokens >= 32")
        text_budget = self.answer_budget(48 if self.kv else 32)
        if self.answer_format == "json":
            tasks = (["qa"] if self.qa else []) + (["kv"] if self.kv else [])
            self.max_new_tokens = answers.json_budget(text_budget, [SCHEMAS[t] for t in tasks], self.max_new_tokens)
        elif self.max_new_tokens is None:
            self.max_new_tokens = text_budget
        scorers.check(self.scorer)
        backends.check(self)
        return self

    @property
    def qa(self) -> bool:
        return self.task in ("qa", "both")

    @property
    def kv(self) -> bool:
        return self.task in ("kv", "both")


class LitmSuite:
    """Cells, prompts and scoring of the lost-in-the-middle suite (the runner does the rest)."""

    name = SUITE

    def __init__(self, settings: LitmSettings, target: Target, items: Sequence[QAItem], pool: PassagePool,
                 config: str, embedder: Any = None, rag: CorpusRAG | None = None, cache: Path | None = None):
        self.s, self.target, self.pool, self.config, self.rag = settings, target, pool, config, rag
        self.max_new_tokens = settings.max_new_tokens
        self.items = {i.id: i for i in items}
        self.samples = {seed: select_questions(items, settings.questions, seed) for seed in settings.seeds}
        self.distractors = Distractors(pool, embedder, cache)
        self._distractor_ids: dict[tuple[int, str], list[int]] = {}
        self.decodings = answers.decodings(settings.answer_format, settings.constrained)

    # ---- cells
    def cells(self) -> list[Cell]:
        s, out = self.s, []
        for seed in s.seeds:
            for i, item in enumerate(self.samples[seed]):
                if s.qa:
                    q = {"task": "qa", "qid": item.id, "seed": seed}
                    if s.controls:
                        out.append(self._cell(**q, kind="closed_book", k=0, position=None))
                        out.append(self._cell(**q, kind="oracle", k=1, position=0))
                    for k in s.docs:
                        out += [self._cell(**q, kind="position", k=k, position=p)
                                for p in parse_positions(s.positions, k)]
                    out += [self._cell(task="rag", qid=item.id, seed=seed, kind="ordering", k=s.rag_top_k,
                                       position=None, ordering=o) for o in s.orderings]
                if s.kv:
                    for n in s.kv_pairs:
                        out += [self._cell(task="kv", item=i, seed=seed, kind="position", k=n, position=p)
                                for p in parse_positions(s.positions, n)]
        if self.decodings == (None,):
            return out
        return [self._cell(**c.coords, decoding=d) for c in out for d in self.decodings]  # JSON: free / constrained

    def instruction(self, task: str) -> str:
        """How a cell of ``task`` is asked to answer: "" for text, ragkit's JSON-schema instruction for JSON."""
        return structured_instruction(answer_schema(task)) if self.s.answer_format == "json" else ""

    def _cell(self, **coords: Any) -> Cell:
        return Cell(SUITE, self.config, coords)

    def group_key(self, cell: Cell) -> Hashable:
        c = cell.coords
        if c["task"] == "kv":
            return ("kv", c["seed"], c["item"], c["k"])  # one JSON object: only the asked key differs
        if c["task"] == "rag":
            return ("rag", c["seed"], c["qid"])
        if c["kind"] == "position":
            return ("qa", c["seed"], c["qid"], c["k"])  # same distractors: prompts agree up to the gold
        return ("qa-controls", c["seed"], c["qid"])

    # ---- prompts
    def distractor_ids(self, item: QAItem, seed: int) -> list[int]:
        """Pool ids of the distractors of ``item`` for the largest --docs, in prompt order (memoized)."""
        key = (seed, item.id)
        if key not in self._distractor_ids:
            n = max(self.s.docs) - 1
            self._distractor_ids[key] = (self.distractors.hard(item, n) if self.s.distractors == "hard"
                                         else self.distractors.random(item, n, seed))
        return self._distractor_ids[key]

    def qa_docs(self, item: QAItem, seed: int, k: int, position: int) -> list[int]:
        """The prompt's documents as pool ids (GOLD for the gold passage): the first k-1 distractors, gold at ``position``."""
        return place_gold(self.distractor_ids(item, seed)[: k - 1], GOLD, position)

    def doc_texts(self, item: QAItem, doc_ids: Sequence[int]) -> list[str]:
        return [item.gold_passage if d == GOLD else self.pool.passages[d] for d in doc_ids]

    def _ids(self, user: str) -> list[int]:
        return self.target.codec.encode(self.target.codec.render(user))

    def prepare(self, cells: Sequence[Cell]) -> Group:
        jobs = [self._job(c) for c in cells]
        c = cells[0].coords
        if c["task"] == "qa" and c["kind"] == "position":  # the gold-last prompt shares each job's prefix up to its gold
            item = self.items[c["qid"]]
            docs = self.doc_texts(item, self.qa_docs(item, c["seed"], c["k"], c["k"] - 1))
            return Group(jobs, self._ids(qa_user_text(item.question, docs, self.instruction("qa"))))
        return Group(jobs, jobs[0].ids if c["task"] in ("kv", "rag") else None)

    def _job(self, cell: Cell) -> Job:
        c = cell.coords
        row: dict[str, Any] = {"cell_id": cell.cell_id, "suite": SUITE, "config": self.config, **c}
        if c["task"] == "kv":
            obj: KVObject = make_kv(c["k"], c["seed"], c["item"])
            ids = self._ids(kv_user_text(obj, c["position"], self.instruction("kv")))
            golds = [obj.value(c["position"])]
            row.update(question=f"value of key {obj.key(c['position'])}", recipe={"key": obj.key(c["position"])})
        elif c["task"] == "rag":
            ids, extra = self._rag_prompt(cell)
            item = self.items[c["qid"]]
            golds = list(item.answers)
            row.update(question=item.question, **extra)
        else:
            item = self.items[c["qid"]]
            golds = list(item.answers)
            doc_ids = [] if c["kind"] == "closed_book" else [GOLD] if c["kind"] == "oracle" else \
                self.qa_docs(item, c["seed"], c["k"], c["position"])
            ids = self._ids(qa_user_text(item.question, self.doc_texts(item, doc_ids), self.instruction("qa")))
            row.update(question=item.question, recipe={"docs": doc_ids, "pool": self.pool.fingerprint})
        if len(ids) + self.max_new_tokens > self.target.context_window:
            raise TooLongError(f"cell {cell.cell_id} ({c}) needs {len(ids)} prompt + {self.max_new_tokens} answer "
                               f"tokens > the context window of {self.target.context_window}")
        row.update(expected=golds, prompt_tokens=len(ids), max_new_tokens=self.max_new_tokens)
        if self.s.answer_format == "json":
            row.update(answer_format="json")
        schema = answer_schema(c["task"]) if c.get("decoding") == answers.GRAMMAR else None
        return Job(cell, ids, row, golds, schema)

    def _rag_prompt(self, cell: Cell) -> tuple[list[int], dict[str, Any]]:
        """ragkit's own prompt for the question's top-k chunks in the cell's ordering."""
        c = cell.coords
        item = self.items[c["qid"]]
        nodes = self.rag.retrieve(item.question, c["k"])
        schema = answer_schema("rag") if self.s.answer_format == "json" else None
        text, ctx = self.rag.prompt(item.question, nodes, c["ordering"], schema)
        texts = [n.node.get_content() for n in ctx.nodes]
        ranked = [n.node.node_id for n in sorted(nodes, key=lambda n: -(n.score or 0.0))]
        with_answer = [i for i, t in enumerate(texts) if answer_match(t, item.answers)]
        gold_doc = Path(item.gold_doc).parts[-2:]  # corpus folder and file name
        doc_rank = next((r + 1 for r, n in enumerate(nodes)
                         if Path(str(n.node.metadata.get("file_path", ""))).parts[-2:] == gold_doc), None)
        return self.target.codec.encode(text), {
            "answer_in_context": bool(with_answer), "answer_positions": with_answer,
            "answer_rank": next((ranked.index(ctx.nodes[i].node.node_id) + 1 for i in with_answer), None),
            "gold_doc_rank": doc_rank, "chunks_in_prompt": len(ctx.nodes), "chunks_dropped": len(ctx.dropped),
            "recipe": {"chunks": [n.node.node_id for n in ctx.nodes]}}

    def score(self, job: Job, answer: str) -> dict[str, Any]:
        return score_answer(answer, job.payload, job.cell["task"], self.s.scorer, self.s.answer_format)

    # ---- length safety
    def check_lengths(self) -> dict[str, int]:
        """The longest prompt + answer of each configuration; TooLongError before any work if one does not fit."""
        window, longest, problems = self.target.context_window, {}, []
        s = self.s
        for seed in s.seeds:
            for i, item in enumerate(self.samples[seed]):
                if s.qa:
                    k = max(s.docs)
                    docs = self.doc_texts(item, self.qa_docs(item, seed, k, k - 1))
                    text = qa_user_text(item.question, docs, self.instruction("qa"))
                    longest[f"qa k={k}"] = max(longest.get(f"qa k={k}", 0), len(self._ids(text)) + s.max_new_tokens)
                if s.kv:
                    n = max(s.kv_pairs)
                    need = len(self._ids(kv_user_text(make_kv(n, seed, i), 0, self.instruction("kv")))) + s.max_new_tokens
                    longest[f"kv pairs={n}"] = max(longest.get(f"kv pairs={n}", 0), need)
        for what, n in longest.items():
            if n > window:
                problems.append(f"{what}: {n} tokens (prompt + {s.max_new_tokens} for the answer)")
        if problems:
            raise TooLongError(f"the longest prompts exceed the model's context window of {window} tokens: "
                               f"{'; '.join(problems)}; use fewer --docs / --kv-pairs (nothing was run)")
        return longest


def score_answer(answer: str, golds: Sequence[str], task: str, scorer: str, answer_format: str = "text") -> dict[str, Any]:
    """The row fields a scorer writes for one answer; JSON answers also get the format checks (parses, valid,
    only the object) and strict judges the object's field."""
    if answer_format != "json":
        return scorers.record(qa_scores(answer, golds, task), scorer)
    field = FIELDS["kv" if task == "kv" else "qa"]
    return {**answers.json_checks(answer, answer_schema(task)),
            **scorers.record(qa_scores(answer, golds, task, field), scorer)}


def rescore_row(row: dict[str, Any], scorer: str, run: dict[str, Any]) -> dict[str, Any]:
    """A stored row's score fields under ``scorer`` (``run``: its run.json, unused here)."""
    return score_answer(row["answer"], row["expected"], row["task"], scorer, row.get("answer_format", "text"))


# ---------------------------------------------------------------- run


def execute(s: LitmSettings, target: Target | None = None) -> Path:
    """Run (or resume) a lost-in-the-middle run; returns its directory. ``target``: an already loaded model."""
    qa_path = _repo_path(s.qa_file)
    items = load_qa(qa_path)
    corpus = [_repo_path(p) for p in s.corpus]
    pool = PassagePool.from_paths(corpus)

    def build(opened: Opened) -> tuple[LitmSuite, dict[str, Any]]:
        cache = Path(s.cache_dir) if s.cache_dir else cache_dir()
        need_embedder = s.qa and (s.distractors == "hard" or s.orderings)
        embedder = load_embedder() if need_embedder else None
        rag = None
        if s.qa and s.orderings:
            key = hashlib.sha256("\n".join(str(p.resolve()) for p in corpus).encode()).hexdigest()[:12]
            rag = CorpusRAG(cache / f"rag-index-{key}-c{s.chunk_tokens}", corpus, opened.target.llm, s.chunk_tokens,
                            embedder, s.store, table_prefix="litm")
        suite = LitmSuite(s, opened.target, items, pool, opened.config, embedder, rag, cache)
        longest = suite.check_lengths()
        if rag is not None:
            rag.ingest(show_progress=s.progress)
        return suite, {"longest_prompts": longest, "qa_file": portable_path(qa_path, opened.out),
                       "corpus_files": len(set(pool.sources)), "pool_passages": len(pool.passages)}

    return run_suite(RECORD, s, {"pool": pool.fingerprint, "qa_fingerprint": _fingerprint(qa_path)}, build, target)


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.lost_in_middle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", choices=TASKS, help="qa: multi-document QA (+ orderings); kv: key-value retrieval; both (default)")
    a("--docs", help="documents per QA prompt, comma list (default 10,20)")
    a("--positions", help="gold positions: all, or a comma list of first, middle, last and 0-based integers "
                          "(default first,middle,last)")
    a("--kv-pairs", help="key-value pairs per JSON object, comma list (default 25,50)")
    a("--distractors", choices=DISTRACTORS, help="hard: most similar passages without an answer (default); random")
    a("--orderings", help="ragkit ordering strategies to compare in RAG: all (default), none, or a comma list")
    a("--questions", type=int, help="questions (and KV objects) per seed (default 10: about 10 minutes on 2 CPU cores)")
    a("--seeds", help="comma list of seeds; each draws its own questions and KV objects (default 1)")
    backends.add_model_flags(a)
    a("--rag-top-k", type=int, help="orderings: chunks retrieved per question (default 10)")
    a("--chunk-tokens", type=int, help="orderings: chunk size of the corpus index in embedder tokens (default 128)")
    a("--store", help="orderings: postgresql://... vector store (pgvector) for the corpus chunks instead of FAISS")
    a("--no-controls", dest="controls", action="store_const", const=False, help="skip closed-book and oracle")
    a("--max-new-tokens", type=int, help="generation budget per answer, thinking included (default 32; 48 with "
      "kv; +1024 with --reasoning high)")
    a("--qa-file", help="QA rows (default corpora/qa/qa.jsonl)")
    a("--corpus", nargs="+", help="folders of .txt files for distractors and the RAG index (default corpora/sqlite corpora/python)")
    a("--out", help="run directory (default runs/lost_in_middle-<UTC time>)")
    a("--resume", action="store_const", const=True, help="continue a killed run in --out without redoing finished cells")
    a("--cache-dir", help="where passage embeddings and the corpus index are kept across runs (default ~/.cache/ragkit/evals)")
    a("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    answers.add_flags(a)
    backends.add_flags(a)
    a("--config", help="YAML suite file (evals/suites/litm*.yaml); flags given on the command line win")
    a("--scorer", choices=tuple(scorers.SCORERS), help="strict: the answer commits to a gold answer, not hedged "
      "or negated, no other key's value claimed (default); lenient: a gold answer occurs anywhere in the reply")
    a("--rescore", metavar="RUN", help="re-score the stored answers of run directory RUN with --scorer (no "
      "generation) and rewrite its report; with --out into a new run directory instead of RUN itself")
    return p


def settings_from_args(argv: Sequence[str] | None = None) -> LitmSettings:
    args = _parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "rescore")}
    return LitmSettings(**merge_settings(load_suite_file(args.config) if args.config else {}, flags,
                                         LitmSettings.fields()))


def main(argv: Sequence[str] | None = None) -> int:
    def command() -> None:
        args = _parser().parse_args(argv)
        if args.rescore:
            rescore_command(RECORD, args.rescore, args.scorer, args.out)
            return
        execute(settings_from_args(argv))

    return cli_exit(command)

