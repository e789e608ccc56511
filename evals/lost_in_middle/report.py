"""Report of a lost-in-the-middle run: summary.csv, curve.png, orderings.png, report.md (rebuilt from results.jsonl)."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pandas as pd

from evals.core.report import code_line, json_table, rate_table, rate_text, scoring_line
from evals.core.scoring import wilson
from evals.core.stats import mcnemar_exact
from evals.core.store import RunDir

BY = ["task", "kind", "k", "position", "ordering"]


def frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a DataFrame with every grouping column present; ``unit`` names the paired item (question or object)."""
    df = pd.DataFrame(rows)
    for col in ("ordering", "position", "qid", "item"):
        if col not in df:
            df[col] = None
    df["position"] = df["position"].astype("Int64")
    df["unit"] = [f"{s}:{q}" if t != "kv" else f"{s}:{i}" for t, s, q, i in
                  zip(df["task"], df["seed"], df["qid"], df["item"])]
    df["found"] = df["found"].astype(bool)
    return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy with Wilson 95% intervals per (task, kind, k, position, ordering[, decoding]), plus prompt tokens
    (and, for JSON answers, how many parse, validate and are only the object)."""
    by = BY + (["decoding"] if "decoding" in df else [])
    out = rate_table(df, by)
    agg = {"prompt_tokens": ("prompt_tokens", "mean"),
           **{c: (c, "sum") for c in ("json_parses", "json_valid", "json_only") if c in df}}
    more = df.groupby(by, dropna=False, sort=True).agg(**agg).reset_index()
    out = out.merge(more, on=by)
    if "answer_in_context" in df:
        rag = df[df["task"] == "rag"].groupby(by, dropna=False).agg(answer_in_context=("answer_in_context", "mean"))
        out = out.merge(rag.reset_index(), on=by, how="left")
    return out.round(4)


def by_decoding(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """("", rows) for text answers; (" (free JSON)", rows), (" (constrained JSON)", rows) for a JSON run."""
    if "decoding" not in df:
        return [("", df)]
    return [(f" ({dec} JSON)", df[df["decoding"] == dec]) for dec in dict.fromkeys(df["decoding"])]


def paired(df: pd.DataFrame, a: pd.Series, b: pd.Series) -> tuple[int, int, int, float]:
    """McNemar between two selections of ``df`` (boolean masks), on the units both contain."""
    x = df[a].set_index("unit")["found"]
    y = df[b].set_index("unit")["found"]
    common = x.index.intersection(y.index)
    t = mcnemar_exact(list(x[common]), list(y[common]))
    return t.n, t.a_only, t.b_only, t.p_value


def write_report(run_dir: RunDir) -> pd.DataFrame:
    """summary.csv, curve.png, orderings.png (when orderings ran) and report.md of a run."""
    rows = run_dir.rows()
    if not rows:
        return pd.DataFrame()
    df = frame(rows)
    table = summary(df)
    table.to_csv(run_dir.path / "summary.csv", index=False)
    curve(df, run_dir.path / "curve.png", run_dir.path.name)
    run = run_dir.read_run()
    if (df["task"] == "rag").any():
        orderings_plot(df, run_dir.path / "orderings.png", run_dir.path.name, run["settings"].get("orderings") or [])
    (run_dir.path / "report.md").write_text(markdown(df, run, run_dir.path.name))
    return table


def _rate_ci(d: pd.DataFrame) -> tuple[float, float, float, int, int]:
    k, n = int(d["found"].sum()), len(d)
    lo, hi = wilson(k, n)
    return (k / n if n else float("nan")), lo, hi, k, n


def curve(df: pd.DataFrame, path: Path, title: str) -> None:
    """Accuracy vs gold position (1-based), one line per document count with 95% intervals; closed-book and
    oracle as horizontal bands (rate line, interval shaded). A second panel shows key-value retrieval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [t for t in ("qa", "kv") if (df["task"] == t).any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, task in zip(axes[0], panels):
        d = df[(df["task"] == task) & (df["kind"] == "position")]
        for key, g in d.groupby(["k"] + (["decoding"] if "decoding" in d else [])):
            k, dec = (key + ("",))[:2] if isinstance(key, tuple) else (key, "")
            pts = [(int(p) + 1, *_rate_ci(gp)) for p, gp in g.groupby("position")]
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            err = [[y - p[2] for y, p in zip(ys, pts)], [p[3] - y for y, p in zip(ys, pts)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{k} {'documents' if task == 'qa' else 'pairs'}{f', {dec}' if dec else ''}")
        for kind, colour in (("oracle", "tab:green"), ("closed_book", "tab:gray")):
            c = df[(df["task"] == task) & (df["kind"] == kind)]
            if len(c):
                rate, lo, hi, k, n = _rate_ci(c)
                ax.axhspan(lo, hi, color=colour, alpha=0.15)
                ax.axhline(rate, color=colour, linestyle="--", label=f"{kind.replace('_', '-')} {k}/{n}")
        ax.set_xticks(sorted({int(p) + 1 for p in d["position"].dropna()}))
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("position of the gold document (1 = first)" if task == "qa" else "position of the asked key")
        ax.set_ylabel("accuracy")
        ax.set_title("multi-document QA" if task == "qa" else "key-value retrieval")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _names(rag: pd.DataFrame, order: list[str]) -> list[str]:
    """Ordering names in the run's settings order (then any others found in the rows)."""
    found = set(rag["ordering"])
    return [o for o in order if o in found] + sorted(found - set(order))


def orderings_plot(df: pd.DataFrame, path: Path, title: str, order: list[str]) -> None:
    """Accuracy per ragkit ordering strategy with 95% intervals; oracle and closed-book as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = df[df["task"] == "rag"]
    if "decoding" in d:  # one bar per ordering and decoding
        d = d.assign(ordering=d["ordering"] + " " + d["decoding"])
    names = _names(d, order)
    stats = [_rate_ci(d[d["ordering"] == o]) for o in names]
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(names), 3.6))
    ys = [s[0] for s in stats]
    ax.bar(range(len(names)), ys, yerr=[[y - s[1] for y, s in zip(ys, stats)], [s[2] - y for y, s in zip(ys, stats)]],
           capsize=4, color="tab:blue", alpha=0.8)
    for kind, colour in (("oracle", "tab:green"), ("closed_book", "tab:gray")):
        c = df[(df["task"] == "qa") & (df["kind"] == kind)]
        if len(c):
            ax.axhline(_rate_ci(c)[0], color=colour, linestyle="--", label=kind.replace("_", "-"))
    ax.set_xticks(range(len(names)), [f"{o}\n{s[3]}/{s[4]}" for o, s in zip(names, stats)])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"RAG top-{int(d['k'].iloc[0])}: ragkit ordering strategies", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _fmt(d: pd.DataFrame) -> str:
    return rate_text(int(d["found"].sum()), len(d))


def _p(p: float) -> str:
    return f"{p:.3f}" + (" *" if p < 0.05 else "")


def markdown(df: pd.DataFrame, run: dict, name: str) -> str:
    m, st, git = run.get("model", {}), run.get("settings", {}), run.get("git", {})
    lines = [f"# Lost in the middle: {name}", "",
             f"- **Model**: {m.get('name')} ({m.get('architecture')}, {m.get('parameters', 0) / 1e6:.0f}M parameters), "
             f"quantization **{m.get('quant')}**, dtype {m.get('dtype')}, device {m.get('device')}, "
             f"context window {m.get('context_window')} tokens",
             f"- **Settings**: task {st.get('task')}; docs {st.get('docs')}; positions `{st.get('positions')}`; "
             f"{st.get('distractors')} distractors; {st.get('questions')} questions per seed, seeds {st.get('seeds')}; "
             f"kv pairs {st.get('kv_pairs')}; orderings {st.get('orderings')} (RAG top-{st.get('rag_top_k')}, "
             f"{st.get('chunk_tokens')}-token chunks); answer budget {st.get('max_new_tokens')} tokens"
             + (f"; answers: one JSON object, decoded {' and '.join(dict.fromkeys(df['decoding']))}"
                if "decoding" in df else ""),
             f"- **Longest prompts** (tokens incl. answer budget): {run.get('longest_prompts')}",
             f"- **Code**: {code_line(git)}; "
             f"created {run.get('created')}; config {run.get('config')}", "",
             scoring_line(df, df), "",
             "Accuracy = the reply commits to a gold answer (strict: SQuAD-normalized, whole words, in a clause that "
             "is neither negated nor hedged; for key-value, no other UUID claimed) or, lenient, a gold answer occurs "
             "anywhere in it — `scorer` in each row says which; "
             "`k/n = rate (95% Wilson interval)`. Paired tests: exact McNemar on the same items "
             "(`A only` / `B only` = items only A / only B got right; * = p < 0.05).", ""]
    if "json_valid" in df:
        lines += ["## JSON answers: " + " vs ".join(dict.fromkeys(df["decoding"])), "",
                  "`parses`: a JSON object is in the reply, `valid`: it matches the schema, `only object`: no text "
                  "outside it, `found`: its field holds a gold answer (strict).", ""]
        lines += json_table(df, ["task", "kind", "k", "position", "ordering"]) + [""]
    for suffix, part in by_decoding(df):
        qa = part[part["task"] == "qa"]
        if len(qa):
            lines += [f"## Multi-document QA: accuracy by gold position{suffix}", "", "![curve](curve.png)", ""]
            cb, orc = qa[qa["kind"] == "closed_book"], qa[qa["kind"] == "oracle"]
            if len(cb) or len(orc):
                lines += [f"- closed-book (no documents): **{_fmt(cb)}**",
                          f"- oracle (gold document only): **{_fmt(orc)}**", ""]
            lines += _position_table(qa, "documents")
        kv = part[part["task"] == "kv"]
        if len(kv):
            lines += [f"## Key-value retrieval: accuracy by position of the asked key{suffix}", ""]
            lines += _position_table(kv, "pairs")
        rag = part[part["task"] == "rag"]
        if len(rag):
            lines += _orderings_section(rag, st.get("orderings") or [], suffix)
    lines += ["## How to read this", "",
              "- A **U-shaped** curve (high at the first and last positions, low in the middle) is the "
              "lost-in-the-middle effect; a flat curve means position does not matter for this model.",
              "- The **oracle** band is what the reader achieves with only the right document; the **closed-book** "
              "band what it knows without documents. Points below closed-book mean the distractors hurt more than "
              "the documents help.",
              "- Intervals overlap a lot at small question counts: read the paired p-values, not the gap between "
              "points, before acting on a difference. Raise `--questions` (or add `--seeds`) to narrow them.",
              "- Per-cell answers and prompt recipes are in `results.jsonl`; the numbers behind the plots in `summary.csv`."]
    return "\n".join(lines) + "\n"


def _position_table(d: pd.DataFrame, what: str) -> list[str]:
    d = d[d["kind"] == "position"]
    lines = [f"| {what} | position (1 = first) | accuracy (95% CI) | mean prompt tokens |", "|---|---|---|---|"]
    tests = []
    for k, g in d.groupby("k"):
        positions = sorted(int(p) for p in g["position"].unique())
        for p in positions:
            gp = g[g["position"] == p]
            lines.append(f"| {k} | {p + 1} | {_fmt(gp)} | {gp['prompt_tokens'].mean():.0f} |")
        if len(positions) >= 3:
            mid = positions[len(positions) // 2]
            for edge in (positions[0], positions[-1]):
                n, a, b, p = paired(g, g["position"] == edge, g["position"] == mid)
                tests.append(f"| {k} | {edge + 1} vs {mid + 1} | {n} | {a} | {b} | {_p(p)} |")
    if tests:
        lines += ["", "Paired: edge position vs middle position (same items).", "",
                  f"| {what} | A vs B | items | A only | B only | p |", "|---|---|---|---|---|---|"] + tests
    return lines + [""]


def _orderings_section(rag: pd.DataFrame, order: list[str], suffix: str = "") -> list[str]:
    k = int(rag["k"].iloc[0])
    names = _names(rag, order)
    lines = [f"## RAG: ragkit's ordering strategies (top-{k} chunks from the corpus index){suffix}", "",
             "![orderings](orderings.png)", "",
             "| ordering | accuracy (95% CI) | answer in retrieved chunks | mean prompt tokens |", "|---|---|---|---|"]
    for o in names:
        g = rag[rag["ordering"] == o]
        lines.append(f"| {o} | {_fmt(g)} | {g['answer_in_context'].astype(float).mean():.0%} | "
                     f"{g['prompt_tokens'].mean():.0f} |")
    got = rag[rag["answer_in_context"].astype(bool)]
    if len(got):
        lines += ["", f"Among questions whose retrieved chunks contain an answer ({got['unit'].nunique()}): "
                  + "; ".join(f"{o} {_fmt(got[got['ordering'] == o])}" for o in names) + "."]
    lines += ["", "Paired tests between strategies (same questions):", "",
              "| A | B | questions | A only | B only | p |", "|---|---|---|---|---|---|"]
    for a, b in combinations(names, 2):
        n, x, y, p = paired(rag, rag["ordering"] == a, rag["ordering"] == b)
        lines.append(f"| {a} | {b} | {n} | {x} | {y} | {_p(p)} |")
    return lines + [""]
