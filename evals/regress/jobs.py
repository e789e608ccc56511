"""Scheduled regression jobs: ``python -m evals.regress --suite evals/suites/nightly.yaml --baseline runs/baseline``.

Runs the suite file's entries into ``--runs-dir/<UTC date>``, or compares two finished runs
(``--baseline RUN --candidate RUN``: the entries, suites and settings come from their run.json; a
``--suite`` given too is checked against them), cell by cell (evals.core.compare), and answers with the exit code:
0 no regression, 1 regression, 2 invalid comparison or bad input, 3 another run holds the lock.
See docs/regression.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from filelock import FileLock, Timeout

from evals.core import compare as cmp
from evals.core import registry
from evals.core.errors import EvalError, SettingsError
from evals.core.spec import load_suite_file
from evals.core.store import RUN_JSON, RunDir
from evals.core.targets import QUANTS
from evals.regress import history
from ragkit.errors import RagkitError

OK, REGRESSION, INVALID, LOCKED = 0, 1, 2, 3
ENTRY_KEYS = {"suite", "name", "config", "settings"}
RUN_CONTROL = {"out", "resume"}  # set by evals.regress itself
PLAIN_FILE_SUITE = "needle"  # the suite of a plain suite file (no 'runs:' list), such as evals/suites/nightly.yaml
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Entry:
    """One suite run of a regression job: its name is its subdirectory in a run / baseline directory."""

    name: str
    suite: str
    settings: dict[str, Any] = field(default_factory=dict)

    def build(self, out: Path | None = None, progress: bool = True) -> Any:
        """The suite's settings object (validates every setting); ``out``: run into that directory, resuming."""
        cls = registry.get(self.suite).code.settings
        known = cls.fields()
        unknown = sorted(set(self.settings) - known)
        if unknown:
            raise SettingsError(f"run {self.name!r}: unknown {self.suite} settings {unknown}; known: {sorted(known)}")
        extra = {"out": str(out), "resume": True, "progress": progress} if out else {}
        try:
            return cls(**self.settings, **extra)
        except SettingsError as e:
            raise SettingsError(f"run {self.name!r}: {e} (give it under 'settings:')") from e


def load_entries(path: str | Path, model: str | None = None, quant: str | None = None,
                 adapter: Sequence[str] | None = None) -> list[Entry]:
    """The entries of a regression suite file.

    Either ``runs: [{suite: needle|lost_in_middle, name: ..., config: other.yaml, settings: {...}}, ...]``
    (``config`` and ``name`` optional; ``settings`` overlay ``config``), or a plain needle suite file such as
    evals/suites/nightly.yaml (one entry named ``needle``). ``model``/``quant``/``adapter`` override every entry.
    """
    path = Path(path)
    data = load_suite_file(path)
    if "runs" not in data:
        raw = [{"suite": PLAIN_FILE_SUITE, "settings": data}]
    else:
        if set(data) != {"runs"}:
            extra = sorted(set(data) - {"runs"})
            raise SettingsError(f"{path}: a file with 'runs:' holds nothing else (found {extra})")
        raw = data["runs"]
        if not isinstance(raw, list) or not raw:
            raise SettingsError(f"{path}: 'runs' must be a non-empty list of {{suite: ..., settings: {{...}}}}")
    entries: list[Entry] = []
    for i, item in enumerate(raw):
        where = f"{path}: runs[{i}]"
        if not isinstance(item, dict):
            raise SettingsError(f"{where} must be a mapping like {{suite: needle, settings: {{lengths: 1k}}}}")
        bad = sorted(set(item) - ENTRY_KEYS)
        if bad:
            raise SettingsError(f"{where} has unknown keys {bad}; allowed: {sorted(ENTRY_KEYS)}")
        suite = item.get("suite")
        if registry.get(suite) is None:
            raise SettingsError(f"{where}: suite {suite!r} is unknown; choose one of {', '.join(registry.suites())}")
        settings = dict(load_suite_file(path.parent / item["config"]) if item.get("config") else {})
        overlay = item.get("settings") or {}
        if not isinstance(overlay, dict):
            raise SettingsError(f"{where}: 'settings' must be a mapping of setting: value")
        settings.update({str(k).replace("-", "_"): v for k, v in overlay.items()})
        control = sorted(RUN_CONTROL & set(settings))
        if control:
            raise SettingsError(f"{where}: {control} are set by evals.regress (run dirs live under --runs-dir); "
                                "remove them")
        if model:
            settings["model"] = model
        if quant:
            settings["quant"] = quant
        if adapter:
            settings["adapter"] = list(adapter)
        name = str(item.get("name") or suite)
        if not _NAME.match(name) or name in {e.name for e in entries}:
            raise SettingsError(f"{where}: name {name!r} must be unique and use letters, digits, '_', '.', '-' "
                                "(it names the run's subdirectory)")
        entry = Entry(name, suite, settings)
        entry.build()  # validate now, before any model is loaded
        entries.append(entry)
    return entries


def entry_dir(root: Path, entry: Entry, single: bool) -> Path:
    """An entry's run directory: ``root/<name>``, or ``root`` itself when it is a run dir of a one-entry suite."""
    if single and (root / "run.json").exists():
        return root
    return root / entry.name


def entries_from_runs(candidate: Path, baseline: Path) -> list[Entry]:
    """The entries of two finished runs compared without a suite file: ``candidate`` is one run directory
    (one entry, named after its suite) or a day directory of entry subdirectories (those of the baseline count
    too, so an entry missing on either side is reported as an invalid comparison)."""
    if (candidate / RUN_JSON).exists():
        meta = RunDir(candidate).read_run()
        return [Entry(str(meta.get("suite")), str(meta.get("suite")), meta.get("settings", {}))]
    names = sorted({p.parent.name for root in (candidate, baseline) for p in root.glob(f"*/{RUN_JSON}")})
    if not names:
        raise SettingsError(f"--candidate {candidate} holds no finished run (no {RUN_JSON} in it or in its "
                            "subdirectories); point it at a run directory or a regress day directory")
    entries = []
    for name in names:
        meta = RunDir(candidate / name if (candidate / name / RUN_JSON).exists() else baseline / name).read_run()
        entries.append(Entry(name, str(meta.get("suite")), meta.get("settings", {})))
    return entries


_DROP_SUITE = "drop --suite to compare the runs as they were made, or compare runs of that suite"


def check_runs(entries: list[Entry], root: Path, what: str, source: str, skip: set[str]) -> None:
    """SettingsError naming how the finished runs under ``root`` differ from ``entries`` (from ``source``, a
    suite file or flags): suite, settings (``skip``: the ones allowed to differ) or entries the file lacks."""
    single = len(entries) == 1
    if not (single and (root / RUN_JSON).exists()):
        extra = sorted({p.parent.name for p in root.glob(f"*/{RUN_JSON}")} - {e.name for e in entries})
        if extra:
            raise SettingsError(f"{source} does not describe {what} {root}: it holds entries {extra} that {source} "
                                f"does not name ({', '.join(e.name for e in entries)}); {_DROP_SUITE}")
    for e in entries:
        run = entry_dir(root, e, single)
        if not (run / RUN_JSON).exists():
            continue  # the comparison reports the missing run
        meta = RunDir(run).read_run()
        if meta.get("suite") != e.suite:
            raise SettingsError(f"{source} does not describe {what} {run}: entry {e.name!r} is a {e.suite} suite, "
                                f"the run a {meta.get('suite')} run; {_DROP_SUITE}")
        cls = registry.get(e.suite).code.settings
        want = json.loads(json.dumps(e.build().hashed(), default=str))
        have = meta.get("settings", {})
        keys = (set(want) | set(have) & cls.fields()) - skip
        differ = [f"{k}: {want.get(k)!r} vs the run's {have.get(k)!r}" for k in sorted(keys)
                  if want.get(k) != have.get(k)]
        if differ:
            raise SettingsError(f"{source} does not describe {what} {run} (entry {e.name!r}): "
                                f"{'; '.join(differ[:6])}; {_DROP_SUITE}")


def comparison_entries(args: argparse.Namespace, baseline: Path, candidate: Path) -> list[Entry]:
    """The entries of a job on a finished ``--candidate``: from ``--suite`` checked against both runs, or
    from the runs themselves; ``--model``/``--quant`` are checked against the candidate, never ignored."""
    if args.suite:
        entries = load_entries(args.suite, args.model, args.quant)
        source = f"--suite {args.suite}"
        overridden = {k for k in ("model", "quant") if getattr(args, k)}
        check_runs(entries, candidate, "--candidate", source, set(cmp.UNDER_TEST) - overridden)
        if baseline.exists():
            check_runs(entries, baseline, "--baseline", source, set(cmp.UNDER_TEST))
        return entries
    entries = entries_from_runs(candidate, baseline)
    flags = {k: v for k, v in (("model", args.model), ("quant", args.quant)) if v}
    for e in entries:
        run = entry_dir(candidate, e, len(entries) == 1)
        have = RunDir(run).read_run().get("settings", {}) if (run / RUN_JSON).exists() else flags
        differ = [f"--{k} {v} but the run was made with {k} {have.get(k)!r}" for k, v in flags.items()
                  if have.get(k) != v]
        if differ:
            raise SettingsError(f"--candidate {run}: {'; '.join(differ)}; --model/--quant choose what a job runs, "
                                "drop them to compare the runs as they were made")
    return entries


def run_candidate(entries: list[Entry], run_dir: Path, progress: bool) -> None:
    """Run (or resume) every entry into ``run_dir/<name>``; finished cells are reused."""
    for e in entries:
        print(f"running {e.name} ({e.suite}) into {run_dir / e.name}", file=sys.stderr)
        registry.get(e.suite).code.execute(e.build(run_dir / e.name, progress))


def promote(candidate: Path, baseline: Path) -> None:
    """Make ``candidate`` the baseline: copy it next to the baseline, then swap by renames."""
    baseline = baseline.absolute()
    tmp = baseline.with_name(f".{baseline.name}.new-{time.time_ns()}")
    shutil.copytree(candidate, tmp, symlinks=True, ignore=shutil.ignore_patterns("*.lock", "rag"))
    old = baseline.with_name(f".{baseline.name}.old-{time.time_ns()}")
    if baseline.exists() or baseline.is_symlink():
        baseline.rename(old)
    tmp.rename(baseline)
    if old.is_symlink() or old.is_file():
        old.unlink()
    elif old.exists():
        shutil.rmtree(old)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.regress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--suite", help="regression suite file: 'runs:' list, or a plain needle suite file (required unless "
      "--candidate; with --candidate it is checked against both runs)")
    a("--baseline", required=True, help="baseline directory (one subdirectory per entry, or one run dir)")
    a("--candidate", help="compare this finished run (a run directory or a day directory of entries) instead of "
      "running the suite now; suites and settings come from its run.json files")
    a("--runs-dir", default="runs/regress", help="where today's run goes: RUNS_DIR/<UTC date> (default runs/regress)")
    a("--run-name", help="name of the run directory instead of the UTC date (a rerun with it resumes)")
    a("--model", help="override every entry's model (a local HF directory, .gguf file or 'default')")
    a("--quant", choices=QUANTS, help="override every entry's quantization")
    a("--adapter", nargs="+", help="LoRA adapter directories on every entry's model (the candidate; compare with a "
      "baseline run without them, cell by cell)")
    a("--alpha", type=float, default=0.05, help="significance level of the paired test (default 0.05)")
    a("--min-drop", type=float, default=0.05, help="smallest pass-rate drop that counts (default 0.05)")
    a("--correction", choices=("none", "holm"), default="none",
      help="multiple-comparison correction over a run's groups (default none: each group at alpha)")
    a("--history", help="history table to append to (.parquet or .csv); the trend plot goes next to it (.png)")
    a("--junit", help="write JUnit XML here")
    a("--markdown", help="write the markdown summary here (it is printed either way)")
    a("--update-baseline", action="store_true", help="after comparing, promote the candidate to --baseline")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.alpha < 1:
        raise SettingsError(f"--alpha {args.alpha} must be between 0 and 1")
    if not 0 <= args.min_drop <= 1:
        raise SettingsError(f"--min-drop {args.min_drop} must be a pass-rate difference between 0 and 1")
    if args.run_name and not _NAME.match(args.run_name):
        raise SettingsError(f"--run-name {args.run_name!r}: use letters, digits, '_', '.', '-'")
    if args.candidate and not Path(args.candidate).is_dir():
        raise SettingsError(f"--candidate {args.candidate} is not a directory")
    if not args.suite and not args.candidate:
        raise SettingsError("--suite is required to run a regression job now (it says what to run); to compare "
                            "two finished runs give --baseline RUN --candidate RUN")


def _write_history(path: str, rows: list[dict]) -> None:
    table = history.append(path, rows)
    png = history.plot(table, Path(path).with_suffix(".png"))
    print(f"history: {path} ({len(table)} rows), trend plot: {png}")


def regress(args: argparse.Namespace) -> int:
    """The job under the lock: run or pick the candidate, compare, write the outputs, maybe promote."""
    baseline = Path(args.baseline)
    date = time.strftime("%Y-%m-%d", time.gmtime())
    candidate = Path(args.candidate) if args.candidate else Path(args.runs_dir) / (args.run_name or date)
    entries = (comparison_entries(args, baseline, candidate) if args.candidate
               else load_entries(args.suite, args.model, args.quant, args.adapter))
    if not baseline.exists() and not args.update_baseline:
        raise SettingsError(f"baseline {baseline} does not exist; make one: run once with --update-baseline "
                            "(promotes that run), or point --baseline at a finished run directory")
    if not args.candidate:
        run_candidate(entries, candidate, args.progress)
    single = len(entries) == 1
    if not baseline.exists():
        print(f"no baseline yet: promoting {candidate} to {baseline} (--update-baseline)")
        if args.history:  # the first run is a point of the trend too, compared with nothing
            own = [cmp.compare(e.name, entry_dir(candidate, e, single), entry_dir(candidate, e, single))
                   for e in entries]
            _write_history(args.history, history.rows(own, candidate.name, date, first=True))
        promote(candidate, baseline)
        return OK
    results = [cmp.compare(e.name, entry_dir(baseline, e, single), entry_dir(candidate, e, single),
                           args.alpha, args.min_drop, args.correction) for e in entries]
    code = INVALID if any(r.invalid for r in results) else REGRESSION if any(r.regression for r in results) else OK
    text = cmp.markdown(results, args.alpha, args.min_drop, args.correction, code)
    print(text)
    for r in results:
        if r.invalid:
            print(f"invalid comparison ({r.entry}): {r.invalid}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.junit:
        Path(args.junit).write_text(cmp.junit(results))
    if args.history:
        _write_history(args.history, history.rows(results, candidate.name, date))
    if args.update_baseline:
        promote(candidate, baseline)
        print(f"promoted {candidate} to baseline {baseline} (--update-baseline)")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        runs_dir = Path(args.runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(runs_dir / ".regress.lock", timeout=0)
        try:
            with lock:
                return regress(args)
        except Timeout:
            print(f"error: another evals.regress run holds {lock.lock_file}; not starting a second one "
                  "(it exits 3 so a scheduler can tell it from a regression)", file=sys.stderr)
            return LOCKED
    except (EvalError, RagkitError, yaml.YAMLError) as e:  # ragkit errors carry their own advice
        print(f"error: {e}", file=sys.stderr)
        return INVALID

