"""Candidate vs baseline, cell by cell: is the comparison valid, and where did the pass rate change?

Cells are matched on their *coordinates* (length, depth, seed, ... per suite), not on cell ids: a cell id
hashes the whole configuration, model and quantization included, so the same cell under another model has
another id. What makes two runs comparable is checked separately: every setting except the ones under test
(``UNDER_TEST``) must be equal, both runs must hold exactly the same scored cells, the tokenizer
fingerprints (when recorded) must agree, and a matched cell must have the same prompt length.

Each group of cells (the whole suite, each length, each depth band, each LITM position / document count)
gets an exact McNemar test on its discordant cells: b = pass -> fail, c = fail -> pass,
p = two-sided binomial test of b against b + c at 0.5 (evals.core.stats.mcnemar_exact). A group regresses
when p < alpha (optionally Holm-corrected over the run's groups) AND the pass rate dropped by >= min_drop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from evals.core import registry
from evals.core.errors import EvalError
from evals.core.portable import portable_path
from evals.core.registry import Layout
from evals.core.report import code_line, rate_text
from evals.core.scorers import scorer_of
from evals.core.stats import holm, mcnemar_exact, min_flagged_drop
from evals.core.store import RunDir

# settings allowed to differ between baseline and candidate: what a regression job puts under test
UNDER_TEST = ("model", "quant", "dtype", "backend", "tokenizer", "adapter")


class InvalidComparison(EvalError):
    """The two runs cannot be compared (the message says why); exit code 2."""


@dataclass
class GroupResult:
    name: str
    n: int
    base_pass: int
    cand_pass: int
    b: int  # pass -> fail
    c: int  # fail -> pass
    p_value: float
    p_adjusted: float = 1.0
    regression: bool = False
    improvement: bool = False

    @property
    def drop(self) -> float:
        return (self.base_pass - self.cand_pass) / self.n if self.n else 0.0


@dataclass
class Comparison:
    """One suite entry: baseline vs candidate, or why they cannot be compared."""

    entry: str
    suite: str
    baseline: Path
    candidate: Path
    base_meta: dict[str, Any] = field(default_factory=dict)
    cand_meta: dict[str, Any] = field(default_factory=dict)
    groups: list[GroupResult] = field(default_factory=list)
    worse: list[dict] = field(default_factory=list)  # candidate rows of pass -> fail cells
    better: list[dict] = field(default_factory=list)
    invalid: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def regression(self) -> bool:
        return self.invalid is None and any(g.regression for g in self.groups)

    @property
    def improvement(self) -> bool:
        return self.invalid is None and any(g.improvement for g in self.groups)

    @property
    def overall(self) -> GroupResult | None:
        return self.groups[0] if self.groups else None

    @property
    def status(self) -> str:
        return "invalid" if self.invalid else "regression" if self.regression else "ok"


def _key(row: dict, layout: Layout) -> tuple:
    return tuple(row.get(k) for k in layout.coords)


def _scored_rows(run: RunDir, layout: Layout) -> tuple[dict[tuple, dict], int]:
    """Scored rows by coordinates (a re-run cell: the last row wins) and the number of rows without a score.
    A row made by older code gets the coordinates it lacks from the layout's defaults for its run."""
    out, unscored = {}, 0
    defaults = layout.defaults(run.read_run()) if layout.defaults else {}
    for row in run.rows():
        for k, v in defaults.items():
            row.setdefault(k, v)
        if not layout.scored(row):
            continue
        if not isinstance(row.get("found"), bool):
            unscored += 1
            continue
        out[_key(row, layout)] = row
    return out, unscored


def _check_settings(base: dict, cand: dict) -> None:
    if base.get("suite") != cand.get("suite"):
        raise InvalidComparison(f"the baseline is a {base.get('suite')!r} run, "
                                f"the candidate a {cand.get('suite')!r} run")
    bs, cs = base.get("settings", {}), cand.get("settings", {})
    differ = sorted(k for k in set(bs) | set(cs) if k not in UNDER_TEST and bs.get(k) != cs.get(k))
    if differ:
        detail = "; ".join(f"{k}: baseline {bs.get(k)!r} vs candidate {cs.get(k)!r}" for k in differ[:6])
        raise InvalidComparison(f"settings other than {'/'.join(UNDER_TEST)} differ ({detail}); compare runs of "
                                "the same suite settings, or promote a new baseline with --update-baseline")
    bt = (base.get("model") or {}).get("tokenizer_fingerprint")
    ct = (cand.get("model") or {}).get("tokenizer_fingerprint")
    if bt and ct and bt != ct:
        raise InvalidComparison(f"the tokenizers differ (fingerprint {bt} vs {ct}): the prompts are not the same "
                                "tokens, so cells are not paired; compare models that share a tokenizer")


def _check_scorers(base: dict[tuple, dict], cand: dict[tuple, dict], command: str) -> None:
    """Both runs scored by one and the same scorer (name and version), or InvalidComparison saying how to fix it."""
    used = {name: sorted({scorer_of(r) for r in rows.values()}) for name, rows in (("baseline", base),
                                                                                   ("candidate", cand))}
    if len(used["baseline"]) > 1 or len(used["candidate"]) > 1 or used["baseline"] != used["candidate"]:
        raise InvalidComparison(f"the runs were scored differently (baseline {', '.join(used['baseline'])}; "
                                f"candidate {', '.join(used['candidate'])}); re-score both with the same scorer: "
                                f"{command} --rescore RUN --scorer NAME")


def _describe(key: tuple, layout: Layout) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(layout.coords, key) if v is not None)


def _holm(groups: list[GroupResult]) -> None:
    for g, p in zip(groups, holm([g.p_value for g in groups])):
        g.p_adjusted = p


def compare(entry: str, baseline: Path, candidate: Path, alpha: float = 0.05, min_drop: float = 0.05,
            correction: str = "none") -> Comparison:
    """Compare two finished runs of one suite entry; ``Comparison.invalid`` says why they cannot be."""
    result = Comparison(entry, "?", Path(baseline), Path(candidate))
    try:
        base_run, cand_run = RunDir(baseline), RunDir(candidate)
        result.base_meta, result.cand_meta = base_run.read_run(), cand_run.read_run()
        result.suite = result.base_meta.get("suite", "?")
        _check_settings(result.base_meta, result.cand_meta)
        suite = registry.get(result.suite)
        if suite is None:
            raise InvalidComparison(f"suite {result.suite!r} has no comparison layout; known: "
                                    f"{', '.join(registry.suites())}")
        if not all((m.get("model") or {}).get("tokenizer_fingerprint") for m in (result.base_meta, result.cand_meta)):
            result.notes.append("tokenizer fingerprint not recorded in both runs (made before it existed): "
                                "checked prompt lengths only")
        _pair(result, base_run, cand_run, suite, alpha, min_drop, correction)
    except EvalError as e:  # InvalidComparison, or a damaged run directory: never a crash of the job
        result.invalid = str(e)
    return result


def _pair(result: Comparison, base_run: RunDir, cand_run: RunDir, suite: registry.SuiteRecord, alpha: float,
          min_drop: float, correction: str) -> None:
    layout = suite.layout
    base, base_unscored = _scored_rows(base_run, layout)
    cand, cand_unscored = _scored_rows(cand_run, layout)
    problems = []
    for name, rows, unscored, other, meta in (("baseline", base, base_unscored, cand, result.base_meta),
                                              ("candidate", cand, cand_unscored, base, result.cand_meta)):
        want = set(other) | (layout.expected(meta) if layout.expected else set())
        missing = sorted((k for k in want if k not in rows), key=str)
        if missing:
            problems.append(f"the {name} lacks {len(missing)} cell(s), e.g. {_describe(missing[0], layout)} "
                            f"(unfinished run? resume it)")
        if unscored:
            problems.append(f"the {name} has {unscored} cell(s) without a score (errors)")
    if not base:
        problems.append("the baseline has no scored cells")
    if problems:
        raise InvalidComparison("; ".join(problems))
    _check_scorers(base, cand, suite.command)
    lengths = [k for k in base if base[k].get("prompt_tokens") is not None and cand[k].get("prompt_tokens") is not None
               and base[k]["prompt_tokens"] != cand[k]["prompt_tokens"]]
    if lengths:
        k = lengths[0]
        raise InvalidComparison(f"{len(lengths)} paired cell(s) have different prompts, e.g. {_describe(k, layout)}: "
                                f"{base[k]['prompt_tokens']} vs {cand[k]['prompt_tokens']} tokens (tokenizer, chat "
                                "template or haystack changed)")
    keys = sorted(base, key=lambda k: tuple((v is None, 0 if v is None else v) for v in k))
    by_dimension: list[dict[str, list[tuple]]] = []
    for key in keys:
        for i, g in enumerate(layout.groups(base[key])):
            by_dimension += [{} for _ in range(i + 1 - len(by_dimension))]
            by_dimension[i].setdefault(g, []).append(key)
    by_dimension = [dim for dim in by_dimension if len(dim) > 1 or not next(iter(dim)).split()[-2:-1] == ["genre"]]
    members = {"all cells": keys} | {g: ks for dim in by_dimension for g, ks in dim.items()}
    for name, keys in members.items():
        a = [base[k]["found"] for k in keys]
        b = [cand[k]["found"] for k in keys]
        t = mcnemar_exact(a, b)
        result.groups.append(GroupResult(name, t.n, sum(a), sum(b), t.a_only, t.b_only, t.p_value, t.p_value))
    if correction == "holm":
        _holm(result.groups)
    for g in result.groups:
        g.regression = g.p_adjusted < alpha and g.drop >= min_drop
        g.improvement = g.p_adjusted < alpha and -g.drop >= min_drop
    for key in keys:
        if base[key]["found"] != cand[key]["found"]:
            row = {"cell": _describe(key, layout), "baseline_answer": base[key].get("answer"),
                   "candidate_answer": cand[key].get("answer"), "expected": cand[key].get("expected")}
            (result.worse if base[key]["found"] else result.better).append(row)


# ---------------------------------------------------------------- reports


def _who(meta: dict) -> str:
    s, git = meta.get("settings", {}), meta.get("git") or {}
    adapters = [a["sha256"][:12] for a in s.get("adapter") or []]
    adapter = f" · adapter {'+'.join(adapters)}" if adapters else ""
    return (f"model {s.get('model')} · quant {s.get('quant')} · dtype {s.get('dtype') or 'default'}{adapter}; "
            f"{code_line(git)}")


def _cells(n: int) -> str:
    return f"{n} paired cell{'s' if n != 1 else ''}"


def _power(groups: list[GroupResult], alpha: float, min_drop: float, correction: str) -> str:
    """How big a drop this grid could have flagged: the fewest one-way pass -> fail cells that reach p < alpha
    (Holm: the first group it tests is held to alpha / groups) and the min drop, overall and in the smallest group."""
    level = alpha / len(groups) if correction == "holm" else alpha
    where = f"at alpha {alpha}" + (f" (Holm: {level:.3g} for the first of {len(groups)} groups)"
                                   if correction == "holm" else "") + f", min drop {min_drop:.0%}"

    def need(g: GroupResult) -> str:
        b = min_flagged_drop(g.n, level, min_drop)
        return f"a drop of ≥ {b} cells ({b / g.n:.0%})" if b else "no drop at all"

    overall, smallest = groups[0], min(groups, key=lambda g: g.n)
    text = (f"**Detectable drop:** with {_cells(overall.n)}, {need(overall)} would have been flagged {where} "
            "(every changed cell going pass → fail)")
    if smallest.n < overall.n:
        text += f"; in the smallest group ({smallest.name}, {_cells(smallest.n)}) {need(smallest)}"
    if min_flagged_drop(overall.n, level, min_drop) is None:
        text += ". No regression here is not evidence of no change: add seeds or depths"
    return text + "."


def markdown(results: list[Comparison], alpha: float, min_drop: float, correction: str, exit_code: int) -> str:
    """What changed, where, and how sure: one section per suite entry."""
    verdict = {0: "no regression", 1: "REGRESSION", 2: "INVALID COMPARISON"}[exit_code]
    lines = [f"# Regression check: {verdict} (exit {exit_code})", "",
             f"Exact McNemar test per group (two-sided binomial on discordant cells), alpha {alpha}, "
             f"min drop {min_drop:.0%}, correction {correction}. Rates: passed/n with the 95% Wilson interval.", ""]
    for r in results:
        lines += [f"## {r.entry} ({r.suite}): {r.status}", "",
                  f"- baseline: `{portable_path(r.baseline)}` ({_who(r.base_meta)})",
                  f"- candidate: `{portable_path(r.candidate)}` ({_who(r.cand_meta)})"]
        lines += [f"- note: {n}" for n in r.notes]
        if r.invalid:
            lines += ["", f"**Invalid comparison:** {r.invalid}", ""]
            continue
        lines += ["", "| group | n | baseline | candidate | change | pass→fail | fail→pass | p | verdict |",
                  "|---|---:|---|---|---:|---:|---:|---:|---|"]
        for g in r.groups:
            verdict_g = "**regression**" if g.regression else "improvement" if g.improvement else ""
            p = f"{g.p_value:.3g}" + (f" (adj {g.p_adjusted:.3g})" if correction != "none" else "")
            lines.append(f"| {g.name} | {g.n} | {rate_text(g.base_pass, g.n)} | {rate_text(g.cand_pass, g.n)} | "
                         f"{(g.cand_pass - g.base_pass) / max(g.n, 1):+.0%} | {g.b} | {g.c} | {p} | {verdict_g} |")
        lines += ["", _power(r.groups, alpha, min_drop, correction)]
        worse = [g.name for g in r.groups if g.regression]
        if worse:
            lines += ["", f"**Got worse in:** {', '.join(worse)}."]
        for title, cells in (("Cells that went pass → fail", r.worse), ("Cells that went fail → pass", r.better)):
            if cells:
                lines += ["", f"{title} ({len(cells)}):", ""]
                lines += [f"- {c['cell']}: expected {c['expected']}, baseline {c['baseline_answer']!r}, "
                          f"candidate {c['candidate_answer']!r}" for c in cells[:20]]
                if len(cells) > 20:
                    lines.append(f"- ... and {len(cells) - 20} more")
        lines.append("")
    return "\n".join(lines) + "\n"


def junit(results: list[Comparison]) -> str:
    """JUnit XML: one testsuite per entry, one testcase per compared group, a failure for each regression."""
    root = ET.Element("testsuites", name="evals.regress")
    for r in results:
        suite = ET.SubElement(root, "testsuite", name=r.entry)
        if r.invalid:
            case = ET.SubElement(suite, "testcase", classname=f"regress.{r.entry}", name="comparison is valid")
            ET.SubElement(case, "error", message=r.invalid, type="InvalidComparison").text = r.invalid
            suite.attrib.update(tests="1", errors="1", failures="0")
            continue
        for g in r.groups:
            case = ET.SubElement(suite, "testcase", classname=f"regress.{r.entry}", name=g.name)
            text = (f"{g.name}: baseline {rate_text(g.base_pass, g.n)}, candidate {rate_text(g.cand_pass, g.n)}, "
                    f"pass->fail {g.b}, fail->pass {g.c}, p={g.p_value:.3g}")
            if g.regression:
                ET.SubElement(case, "failure", message=text, type="Regression").text = text
            else:
                ET.SubElement(case, "system-out").text = text + (" (improvement)" if g.improvement else "")
        suite.attrib.update(tests=str(len(r.groups)), failures=str(sum(g.regression for g in r.groups)), errors="0")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
