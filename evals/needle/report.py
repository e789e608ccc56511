"""Reports of a needle run directory: summary.csv (pandas), heatmap.png (depth x length), report.md (read it first)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from evals.core.report import code_line, json_table, rate_table, rate_text, scoring_line
from evals.core.stats import holm, mcnemar_exact
from evals.core.store import RunDir
from evals.needle.haystack import run_haystack_sets
from evals.needle.layout import grid, length_label


def collapse_controls(df: pd.DataFrame) -> pd.DataFrame:
    """Needle rows as they are; control rows merged into one per distinct prompt (mode, length, question, recipe,
    tokens): seeds that read one haystack with one question were one generation, counted once. The merged row
    is found when any of its rows was, and ``control_cells`` says how many seeds' controls stand behind it."""
    needles, controls = df[df["kind"] != "control"], df[df["kind"] == "control"]
    if controls.empty:
        return df
    seeds = [len(c) if isinstance(c, list) else 1 for c in controls.get("control_seeds", [None] * len(controls))]
    controls = controls.assign(control_cells=seeds, _prompt=[
        json.dumps([r.get("mode"), r.get("genre"), r.get("length"), r.get("question"), r.get("recipe"),
                    r.get("prompt_tokens"), r.get("chunks"), r.get("decoding")], sort_keys=True, default=str)
        for r in controls.to_dict("records")])
    merged = controls.groupby("_prompt", sort=False).agg(
        {**{c: "first" for c in controls.columns if c != "_prompt"}, "found": "max", "score": "max",
         "control_cells": "sum"})
    return pd.concat([needles, merged.reset_index(drop=True)], ignore_index=True)


def needle_frame(rows: list[dict], run: dict) -> pd.DataFrame:
    """The rows as a DataFrame with a ``genre`` on every row (rows made before genres: the run's one set) and
    controls collapsed to one per distinct prompt."""
    df = pd.DataFrame(rows)
    single = next(iter(run_haystack_sets(run)))
    df["genre"] = df["genre"].fillna(single) if "genre" in df else single
    return collapse_controls(df)


def _decodings(df: pd.DataFrame) -> list[str | None]:
    """The decodings of a JSON run's cells (free, constrained), or [None] for text answers."""
    return list(dict.fromkeys(df["decoding"])) if "decoding" in df else [None]


def _panels(df: pd.DataFrame) -> list[tuple[str, str, str | None, pd.DataFrame]]:
    """(mode, genre, decoding, rows) of every panel a report shows on its own."""
    out = []
    for mode in ("context", "rag"):
        for genre in _genres(df):
            for dec in _decodings(df):
                d = df[(df["mode"] == mode) & (df["genre"] == genre)]
                d = d if dec is None else d[d["decoding"] == dec]
                if len(d):
                    out.append((mode, genre, dec, d))
    return out


def needle_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One line per (mode, genre, kind, length, depth): rates with intervals (controls: over distinct prompts),
    tokens, needle positions, retrieval."""
    df = df.copy()
    df["depth"] = df["depth"].astype(float)
    by = ["mode", "genre", "kind", "length", "depth"] + (["decoding"] if "decoding" in df else [])
    out = rate_table(df, by)
    extra = {"prompt_tokens": "mean", "actual_tokens": "mean", "target_tokens": "first"}
    for col in ("json_parses", "json_valid", "json_only"):
        if col in df:
            df[col] = df[col].astype(float)
            extra[col] = "sum"
    if "control_cells" in df:
        extra["control_cells"] = "sum"
    if "needle_depth_actual" in df:
        extra["needle_depth_actual"] = "mean"
    if "found_lenient" in df:
        df["found_lenient"] = df["found_lenient"].astype(float)
        extra["found_lenient"] = "sum"
    if "retrieved" in df:
        df["retrieved"] = df["retrieved"].astype(float)
        extra.update(retrieved="mean", retrieval_rank="median")
    more = df.groupby(by, dropna=False, sort=True).agg(extra).reset_index()
    return out.merge(more, on=by).round(4)


def write_needle_report(run_dir: RunDir) -> pd.DataFrame:
    """summary.csv, heatmap.png and report.md of a needle run (rewritten from results.jsonl each time)."""
    rows = run_dir.rows()
    if not rows:
        return pd.DataFrame()
    run = run_dir.read_run()
    df = needle_frame(rows, run)
    summary = needle_summary(df)
    summary.to_csv(run_dir.path / "summary.csv", index=False)
    m, st = run.get("model", {}), run.get("settings", {})
    title = (f"{run_dir.path.name}: {m.get('loaded_from') or m.get('name')}, quant {m.get('quant')}, "
             f"{m.get('dtype')} · needle {st.get('needle')}, seeds {st.get('seeds')}")
    heatmap(df, run_dir.path / "heatmap.png", title)
    needle_misses(df).to_csv(run_dir.path / "misses.csv", index=False)
    (run_dir.path / "report.md").write_text(needle_markdown(df, run, run_dir.path.name))
    return summary


MISSES_SHOWN = 30  # misses listed in report.md; misses.csv has every one


def needle_misses(df: pd.DataFrame) -> pd.DataFrame:
    """Every needle cell the scorer did not credit, with what was expected and answered."""
    cols = [c for c in ("mode", "genre", "length", "depth", "seed", "needle_depth_actual", "expected", "answer",
                        "found_strict", "found_lenient", "scorer", "cell_id") if c in df]
    return df.loc[(df["kind"] == "needle") & (~df["found"].astype(bool)), cols]


def heatmap(df: pd.DataFrame, path: Path, title: str) -> None:
    """Depth (rows) x length (columns), colour = mean score, text = found/n; controls in the bottom row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = _panels(df)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 1.3 * df["length"].nunique() * len(panels) + 1.5,
                                                       1.2 + 0.55 * (df["depth"].nunique() + 1)), squeeze=False)
    for ax, (mode, genre, dec, d) in zip(axes[0], panels):
        lengths = sorted(d["length"].unique())
        depths = sorted(d.loc[d["kind"] == "needle", "depth"].astype(float).unique())
        grid = np.full((len(depths) + 1, len(lengths)), np.nan)
        for i, dep in enumerate(depths):
            for j, n in enumerate(lengths):
                c = d[(d["kind"] == "needle") & (d["depth"].astype(float) == dep) & (d["length"] == n)]
                if len(c):
                    grid[i, j] = c["score"].mean()
                    ax.text(j, i, f"{int(c['found'].sum())}/{len(c)}", ha="center", va="center", fontsize=9)
        for j, n in enumerate(lengths):
            c = d[(d["kind"] == "control") & (d["length"] == n)]
            if len(c):
                ax.text(j, len(depths), f"{int(c['found'].sum())}/{len(c)}", ha="center", va="center",
                        fontsize=9, color="dimgray")
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.axhline(len(depths) - 0.5, color="black", linewidth=1.5)
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths) + 1), [f"{x:g}%" for x in depths] + ["no needle\n(invented)"])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        where = f"{mode}, {genre} haystack" if len(_genres(df)) > 1 else mode
        ax.set_title(f"{where}{f', {dec} JSON' if dec else ''}: found / cells")
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of the needle's values in the answer")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _genres(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["genre"]))


def genre_tests(df: pd.DataFrame) -> list[tuple[str, str, str, int, int, int, float]]:
    """Paired exact McNemar of every two genres on the needle cells both hold (same mode, length, seed, depth):
    (mode, genre A, genre B, cells, found A, found B, p), Holm-adjusted over the pairs."""
    nd = df[df["kind"] == "needle"]
    key = ["mode", "length", "seed", "depth"]
    tests = []
    genres = _genres(df)
    for mode in dict.fromkeys(nd["mode"]):
        m = nd[nd["mode"] == mode]
        for i, a in enumerate(genres):
            for b in genres[i + 1:]:
                x = m[m["genre"] == a].set_index(key)["found"].astype(bool)
                y = m[m["genre"] == b].set_index(key)["found"].astype(bool)
                common = x.index.intersection(y.index)
                if len(common):
                    t = mcnemar_exact(list(x[common]), list(y[common]))
                    tests.append([mode, a, b, len(common), int(x[common].sum()), int(y[common].sum()), t.p_value])
    return [(*t[:-1], p) for t, p in zip(tests, holm([t[-1] for t in tests]))]


def genre_lines(df: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """The report's first lines when a run has several genres: do they disagree significantly?"""
    if len(_genres(df)) < 2:
        return []
    tests = genre_tests(df)
    bad = [t for t in tests if t[-1] < alpha]
    fmt = "; ".join(f"{mode} {a} {fa}/{n} vs {b} {fb}/{n} (paired p = {p:.3g})" for mode, a, b, n, fa, fb, p in tests)
    if bad:
        return [f"**Genres disagree significantly**: {fmt} (exact McNemar, Holm-adjusted). A rate of this run is "
                "a statement about its haystack text; read each genre's numbers, not one pooled rate.", ""]
    return [f"Genres agree within chance: {fmt} (exact McNemar, Holm-adjusted; not significant at {alpha}).", ""]


def _behind(cd: pd.DataFrame) -> str:
    """', standing for N seeds' controls' when distinct prompts are fewer than the seeds' controls."""
    cells = int(cd["control_cells"].sum()) if "control_cells" in cd and len(cd) else len(cd)
    return f" (standing for {cells} seeds' controls: a shared haystack is one prompt)" if cells > len(cd) else ""


def structured_lines(df: pd.DataFrame) -> list[str]:
    """JSON answers: per length and depth, free and constrained decoding side by side (the needle cells)."""
    if "json_valid" not in df:
        return []
    nd = df[df["kind"] == "needle"]
    nd = nd.assign(depth=nd["depth"].astype(float))
    return ["", "## JSON answers: " + " vs ".join(_decodings(nd)), "",
            "Needle cells by length (tokens) and depth (%); `parses`: a JSON object is in the answer, `valid`: it matches the schema, `only object`: "
            "no text outside it, `found`: its fields hold the needle's values (strict). Controls are in the "
            "tables below.", ""] + json_table(nd, ["mode", "length", "depth"])


def projected_vs_measured(df: pd.DataFrame, projection: dict) -> pd.DataFrame:
    """Per context length: what ``--plan`` projected (run.json's ``projection``) beside what the run measured:
    wall time (the cells' seconds added up: prefills and their shares of the batched decode steps; prompt
    building not counted, as the projection does not count it), its prefill and decode parts, prompt tokens
    forwarded (``computed_tokens``) and peak GPU memory (the largest ``gpu_peak_bytes``: weights + KV cache +
    activations). ``wall vs plan``: measured / projected - 1."""
    ctx = df[df["mode"] == "context"]
    out = []
    for p in projection["lengths"]:
        d = ctx[ctx["length"] == p["length"]]
        if d.empty:
            continue
        wall, decode = float(d["seconds"].sum()), float(d["decode_seconds"].sum())
        peak = d["gpu_peak_bytes"].max() if "gpu_peak_bytes" in d else float("nan")
        out.append({"length": p["length"], "cells": len(d), "wall s": round(wall, 2),
                    "plan wall s": round(p["seconds"], 2), "wall vs plan": f"{wall / p['seconds'] - 1:+.0%}",
                    "prefill s": round(wall - decode, 2), "plan prefill s": round(p["prefill_s"], 2),
                    "decode s": round(decode, 2), "plan decode s": round(p["decode_s"], 2),
                    "tokens forwarded": int(d["computed_tokens"].sum()), "plan tokens": p["tokens_fed"],
                    "peak GiB": round(peak / 2**30, 2), "plan peak GiB": round(p["peak_bytes"] / 2**30, 2)})
    return pd.DataFrame(out)


def projection_lines(df: pd.DataFrame, run: dict) -> list[str]:
    """The report's "Projected vs measured" section, for a run on a GPU that run.json holds a projection of."""
    projection = run.get("projection")
    table = projected_vs_measured(df, projection) if projection else pd.DataFrame()
    if table.empty:
        return []
    return ["", f"## Projected vs measured ({projection['gpu']})", "",
            "What `--plan` projects for this grid (factors: " + projection["factors"] + ") beside what the run "
            "measured, per length. Wall time: the cells' prefills and decode steps (prompt building and model "
            "loading not counted); peak: GPU memory allocated at most while the length's cells ran.", "",
            "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns),
            *("| " + " | ".join(str(v) for v in r) + " |" for r in table.itertuples(index=False))]


def needle_markdown(df: pd.DataFrame, run: dict, name: str) -> str:
    m, st = run.get("model", {}), run.get("settings", {})
    git = run.get("git", {})
    lines = [f"# Needle in a haystack: {name}", ""] + genre_lines(df)
    lines += [
        f"- **Model**: {m.get('loaded_from') or m.get('name')} ({m.get('architecture')}, {m.get('parameters', 0) / 1e6:.0f}M parameters), "
        f"quantization **{m.get('quant')}**, dtype {m.get('dtype')}, device {m.get('device')}, "
        f"context window {m.get('context_window')} tokens",
        f"- **Needle**: `{st.get('needle')}`, seeds {st.get('seeds')}; depths {st.get('depths')}; "
        f"lengths {st.get('lengths')} (tokens incl. {st.get('max_new_tokens')} for the answer); mode {st.get('mode')}"
        + (f"; answers: one JSON object, decoded {' and '.join(_decodings(df))}" if "decoding" in df else ""),
        f"- **Haystack**: {', '.join(st.get('haystack', []))} (genre {', '.join(_genres(df))}; fingerprint "
        f"{st.get('pool')}); "
        + ("each seed its own text (`--haystack-start seed`)" if st.get("haystack_start") == "seed"
           else "one text for every seed (`--haystack-start fixed`)"),
        f"- **Code**: {code_line(git)}; "
        f"created {run.get('created')}; config {run.get('config')}",
        scoring_line(df, df[df["kind"] == "needle"]), "",
        "## Result", "",
    ]
    planned = (sum(1 for _ in grid(st.get("mode"), _genres(df), st.get("lengths", [])))
               * len(st.get("seeds", [])) * len(st.get("depths", [])))
    done = int((df["kind"] == "needle").sum())
    if planned and done < planned:
        lines += [f"**Incomplete run: {done} of {planned} planned needle cells finished** (lengths without rows "
                  "below were not reached, or skipped as too long); continue it with the same flags and `--resume`.", ""]
    multi = len(_genres(df)) > 1
    for mode, genre, dec, d in _panels(df):
        nd, cd = d[d["kind"] == "needle"], d[d["kind"] == "control"]
        lines.append(f"- **{mode}{f', {genre} haystack' if multi else ''}{f', {dec} JSON' if dec else ''}**: "
                     f"needle found in **{rate_text(int(nd['found'].sum()), len(nd))}** of cells; "
                     f"without a needle the model produced the value in {rate_text(int(cd['found'].sum()), len(cd))} "
                     f"distinct no-needle prompts{_behind(cd)}.")
        if mode == "rag" and len(nd):
            got = nd[nd["retrieved"] == True]  # noqa: E712
            lines.append(f"  - the needle's chunk was retrieved (top-{st.get('top_k')}) in {rate_text(len(got), len(nd))}; "
                         f"median rank {got['retrieval_rank'].median() if len(got) else '-'}; "
                         f"the reader found it in {rate_text(int(got['found'].sum()), len(got))} of those "
                         f"(a miss with the chunk retrieved is the reader's fault, without it the retriever's).")
        if len(nd) and "distractor_answered" in nd and nd["distractor_answered"].any():
            lines.append(f"  - answered a distractor's value in {int(nd['distractor_answered'].sum())} cells.")
    lines += structured_lines(df)
    lines += ["", "## By length", "", "| mode | genre | decoding | length | found (95% CI) | mean score | "
              "no-needle: value invented (distinct prompts) |", "|---|---|---|---|---|---|---|"]
    for mode, genre, dec, panel in _panels(df):
        for length, d in panel.groupby("length", sort=True):
            nd, cd = d[d["kind"] == "needle"], d[d["kind"] == "control"]
            lines.append(f"| {mode} | {genre} | {dec or 'text'} | {length} | {rate_text(int(nd['found'].sum()), len(nd))} | "
                         f"{nd['score'].mean():.2f} | {int(cd['found'].sum())}/{len(cd)} |")
    lines += projection_lines(df, run)
    lines += ["", "## Heatmap", "", "![heatmap](heatmap.png)", "",
              "Rows are needle depths (0% = start of the haystack, 100% = end), columns prompt lengths; each cell "
              "shows found/cells and its colour the mean fraction of expected values in the answer (green = found). "
              "The bottom row is the no-needle control: how often the model produced the value without seeing it "
              "(should be 0). Exact numbers with 95% intervals are in `summary.csv`.", "",
              "## Misses", ""]
    misses = needle_misses(df)
    if misses.empty:
        lines.append("None.")
    else:
        shown = misses.head(MISSES_SHOWN)
        lines += [f"First {len(shown)} of {len(misses)} misses; all {len(misses)} are in `misses.csv`.", "",
                  "| mode | genre | length | depth | actual depth | expected | answer | cell |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in shown.itertuples():
            ans = str(r.answer).replace("|", "\\|").replace("\n", " ")[:80]
            lines.append(f"| {r.mode} | {r.genre} | {r.length} | {r.depth:g}% | {getattr(r, 'needle_depth_actual', '')}% | "
                         f"{', '.join(r.expected)} | {ans} | `{r.cell_id}` |")
        lines += ["", "Rebuild any cell's exact prompt with "
                  "`python -m evals.needle --rebuild-prompt RUN_DIR CELL_ID`."]
    return "\n".join(lines) + "\n"
