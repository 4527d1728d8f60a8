"""`report`: score cached predictions and render the leaderboard. No model is called.

The flow, top to bottom:

1. **collect** – every run folder's ``predictions/*.parquet`` (written by `infer`). Two
   run folders with the same label are refused (their rows would merge on the leaderboard).
2. **score** – each (benchmark, task) with its protocol's comparison under one answer rule
   (``reference`` by default, the reference implementation's; ``lenient`` on request) and
   its metrics (`pipeline.metrics`), with 95 % bootstrap intervals resampled by video; LVU
   also gets the average of the tasks present. Scores are cached per predictions
   fingerprint, which includes the answer rule and its version, so an unchanged run is not
   re-scored and a rule change re-scores.
3. **render** – ``metrics.parquet`` (tidy; its ``answer_rule`` column names the rule as
   ``name@version``), ``leaderboard.md`` and ``leaderboard.html`` with one table per
   benchmark family and the answer rule in their heading, every run beside the paper's
   reference and ablation rows, best values marked; PNG plots beside them.
"""
from __future__ import annotations

import hashlib
import html
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa

from pipeline.benchmarks import PROTOCOLS, protocol
from pipeline import layout, storage
from pipeline import metrics as scoring  # `metrics` names the metric tables here
from pipeline.metrics import ANSWER_RULES, lvu_average_tasks
from pipeline.metrics import answer_rule as get_rule

METRIC_SCHEMA = pa.schema([("run", pa.string()), ("benchmark", pa.string()), ("task", pa.string()),
                           ("metric", pa.string()), ("value", pa.float64()), ("n", pa.int64()),
                           ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("answer_rule", pa.string()),
                           ("fingerprint", pa.string())])
PAPER_ROW = "MA-LMM (paper)"
ABLATION_ROW_PREFIX = "paper ablation: "
FAMILY_TITLES = {"classification": "Long-term video classification (top-1 / top-5 %)",
                 "qa": "Video question answering (top-1 / top-5 %)",
                 "caption": "Video captioning (×100)",
                 "anticipation": "Action anticipation (%)"}
#: bump when what report computes from the same predictions and rule changes (metrics added, …)
SCORES_VERSION = 2


class DuplicateRunLabel(ValueError):
    """Two run folders given to one report carry the same label."""


def run_label(run_dir: Path) -> str:
    info = layout.infer_info_path(run_dir)
    if storage.exists(info):
        label = storage.read_json(info).get("config", {}).get("label")
        if label:
            return label
    return run_dir.name


def check_labels(run_dirs: list[Path]) -> dict[Path, str]:
    """Each run folder's label; two different folders with one label are an error naming both."""
    labels: dict[Path, str] = {}
    first: dict[str, Path] = {}
    clashes = []
    for d in run_dirs:
        key = storage.resolved(d)
        if key in labels:  # the same folder given twice: once is enough
            continue
        label = labels[key] = run_label(d)
        if label in first:
            clashes.append(f"{first[label]} and {d} are both labelled {label!r}")
        else:
            first[label] = d
    if clashes:
        raise DuplicateRunLabel("; ".join(clashes) + ". Their rows would merge on the leaderboard: give each run "
                                "its own label (`malmm-pipeline infer --label NAME`, or config.label in the run's "
                                "infer.json; without one, the folder name is the label)")
    return labels


def predictions_fingerprint(files: list[Path], n_boot: int = 0, answer_rule: str | None = None) -> str:
    """Identity of a run's scores: its prediction files' bytes, the bootstrap size and the
    answer rule with its version (``name@version``)."""
    rule = get_rule(answer_rule or "reference").id
    h = hashlib.sha256(f"n_boot={n_boot};answer_rule={rule};scores=v{SCORES_VERSION}".encode())
    for f in files:
        h.update(f.name.encode())
        h.update(storage.read_bytes(f))
    return h.hexdigest()[:16]


def score_run(run_dir: Path, n_boot: int, cache: pd.DataFrame | None, answer_rule: str = "reference",
              label: str | None = None) -> pd.DataFrame:
    """Tidy metric rows for one run folder (from cache when its predictions and the answer
    rule are unchanged)."""
    rule = scoring.answer_rule(answer_rule)
    files = storage.listdir(layout.predictions_dir(run_dir), "*.parquet")
    if not files:
        raise FileNotFoundError(f"{run_dir}: no predictions/*.parquet; run `malmm-pipeline infer --out {run_dir}`")
    fp = predictions_fingerprint(files, n_boot, rule.id)
    label = label or run_label(run_dir)
    if cache is not None and len(cache) and "answer_rule" in cache.columns:
        hit = cache[(cache.run == label) & (cache.fingerprint == fp) & (cache.answer_rule == rule.id)]
        if len(hit):
            return hit[METRIC_SCHEMA.names]
    rows = []
    for f in files:
        preds = storage.read_parquet(f)
        for (b, t), df in preds.groupby(["benchmark", "task"], sort=True):
            rows += [dict(r) for r in scoring.score(protocol(b, t), df, n_boot=n_boot, rule=rule)]
    rows += [dict(r) for r in scoring.lvu_average([r for r in rows if r["benchmark"] == "lvu"])]
    out = pd.DataFrame(rows)
    out.insert(0, "run", label)
    out["answer_rule"] = rule.id
    out["fingerprint"] = fp
    return out[METRIC_SCHEMA.names]


def run(runs: list[str], out: str = "reports", n_boot: int = 1000, *, plots: bool = True,
        answer_rule: str = "reference") -> dict:
    """Score ``runs`` (run folders) under ``answer_rule`` and write the leaderboard into ``out``."""
    rule = get_rule(answer_rule)  # an unknown rule fails before anything is read
    labels = check_labels([storage.path(r) for r in runs])
    out_dir = storage.makedirs(out)
    cache_path = layout.metrics_path(out_dir)
    cache = storage.read_parquet(cache_path) if storage.exists(cache_path) else None
    frames = []
    done = set()
    for r in runs:
        key = storage.resolved(r)
        if key in done:
            continue
        done.add(key)
        frames.append(score_run(storage.path(r), n_boot, cache, rule.id, labels[key]))
        print(f"report: scored {r}", file=sys.stderr, flush=True)
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=METRIC_SCHEMA.names)
    storage.write_parquet(cache_path, pa.Table.from_pandas(metrics, schema=METRIC_SCHEMA, preserve_index=False))
    images = make_plots(metrics, out_dir) if plots else []
    md, page = render(metrics, [storage.path(p).name for p in images])
    storage.write_text(out_dir / layout.LEADERBOARD_MD, md)
    storage.write_text(out_dir / layout.LEADERBOARD_HTML, page)
    written = [str(cache_path), str(out_dir / layout.LEADERBOARD_MD), str(out_dir / layout.LEADERBOARD_HTML)] + images
    return {"metrics": metrics, "files": written}


# ----------------------------------------------------------------------------- tables

def _fmt(value: float, lo: float, hi: float) -> str:
    if pd.isna(value):
        return "–"
    if pd.isna(lo) or pd.isna(hi):
        return f"{value:.1f}"
    return f"{value:.1f} [{lo:.1f}, {hi:.1f}]"


def column_label(benchmark: str, task: str, metric: str) -> str:
    """A leaderboard column: ``benchmark / task / metric``; an LVU average says what it covers."""
    covers = lvu_average_tasks(task) if benchmark == "lvu" else None
    if covers is not None:
        task = ("average of 7 tasks" if len(covers) == 7 else f"average of {len(covers)} tasks ("
                + ", ".join(covers) + ")")
    return " / ".join(x for x in (benchmark, task, metric) if x)


def paper_value(benchmark: str, task: str, metric: str) -> float | None:
    """The paper's number for a column: the registry's, or for an LVU average the mean of the
    paper's per-task values over the tasks it covers (None when the paper has none)."""
    covers = lvu_average_tasks(task) if benchmark == "lvu" else None
    if covers is not None:
        vals = [protocol("lvu", t).paper.get(metric) for t in covers]
        return float(sum(vals) / len(vals)) if vals and all(v is not None for v in vals) else None
    try:
        return protocol(benchmark, task).paper.get(metric)
    except KeyError:
        return None


def family_tables(metrics: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One wide table per benchmark family: rows = runs (+ paper rows), columns = benchmark / task / metric."""
    fam_of = {(b, t): p.family for (b, t), p in PROTOCOLS.items()}
    tables: dict[str, list[dict]] = {}
    m = metrics[metrics.metric != "n_failed"].copy()
    m["family"] = [fam_of.get((b, t), fam_of.get((b, ""), "classification"))
                   if lvu_average_tasks(t) is None else "classification" for b, t in zip(m.benchmark, m.task)]
    for fam, df in m.groupby("family", sort=False):
        cols: dict[str, dict] = {}
        keys: dict[str, tuple[str, str, str]] = {}
        for r in df.itertuples(index=False):
            col = column_label(r.benchmark, r.task, r.metric)
            keys[col] = (r.benchmark, r.task, r.metric)
            cols.setdefault(col, {})[r.run] = (r.value, r.ci_low, r.ci_high)
        rows = [{"run": run, **{c: v.get(run) for c, v in cols.items()}} for run in dict.fromkeys(df.run)]
        # paper reference rows for the columns present
        nan = float("nan")
        paper, ablations = {}, {}
        for c, (b, t, metric) in keys.items():
            ref = paper_value(b, t, metric)
            if ref is not None:
                paper[c] = (ref, nan, nan)
            if metric == "top1" and lvu_average_tasks(t) is None:
                try:
                    abl = protocol(b, t).ablations
                except KeyError:
                    abl = {}
                for name, val in abl.items():
                    ablations.setdefault(name, {})[c] = (val, nan, nan)
        if paper:
            rows.append({"run": PAPER_ROW, **paper})
        for name, v in ablations.items():
            rows.append({"run": f"{ABLATION_ROW_PREFIX}{name}", **v})
        tables[fam] = rows
    return {fam: pd.DataFrame(rows) for fam, rows in tables.items()}


def is_paper_row(run: str) -> bool:
    """The published reference rows (never a run of ours, whatever the run is called)."""
    return run == PAPER_ROW or str(run).startswith(ABLATION_ROW_PREFIX)


def _best(df: pd.DataFrame, col: str) -> float | None:
    vals = [v[0] for r, v in zip(df.run, df[col]) if isinstance(v, tuple) and not is_paper_row(r)]
    return max(vals) if vals else None


def _rules_line(metrics: pd.DataFrame) -> str:
    """Which answer rule the scores use (per run when they differ)."""
    if "answer_rule" not in metrics.columns or not len(metrics):
        return "Answer rule: not recorded."
    per_run = metrics.groupby("run", sort=False).answer_rule.agg(lambda x: ", ".join(dict.fromkeys(x.astype(str))))
    ids = list(dict.fromkeys(per_run))
    if len(ids) == 1:
        name = ids[0].split("@")[0]
        what = ANSWER_RULES[name].description if name in ANSWER_RULES else "unknown to this version"
        return f"Answer rule: {ids[0]} — {what}."
    return "Answer rules differ between runs: " + "; ".join(f"{r}: {i}" for r, i in per_run.items()) + "."


def render(metrics: pd.DataFrame, images: list[str] = ()) -> tuple[str, str]:
    """Markdown and HTML leaderboards; the best run value of each column is bold."""
    rules = _rules_line(metrics)
    md = ["# Leaderboard", "", "Values are the run's score with its 95 % bootstrap interval (resampled by video); "
          "paper rows are MA-LMM's published numbers. **Bold**: best run per column.", "", rules, ""]
    body = []
    for fam, df in family_tables(metrics).items():
        cols = [c for c in df.columns if c != "run"]
        md += [f"## {FAMILY_TITLES.get(fam, fam)}", "", "| run | " + " | ".join(cols) + " |",
               "|---" * (len(cols) + 1) + "|"]
        thead = "".join(f"<th>{html.escape(c)}</th>" for c in ["run"] + cols)
        trs = []
        best = {c: _best(df, c) for c in cols}
        for _, r in df.iterrows():
            cells_md, cells_html = [], []
            for c in cols:
                v = r[c]
                if not isinstance(v, tuple):
                    cells_md.append("")
                    cells_html.append("<td></td>")
                    continue
                s = _fmt(*v)
                is_best = best[c] is not None and v[0] == best[c] and not is_paper_row(r.run)
                cells_md.append(f"**{s}**" if is_best else s)
                cells_html.append(f"<td class='{'best' if is_best else ''}'>{html.escape(s)}</td>")
            md.append(f"| {r.run} | " + " | ".join(cells_md) + " |")
            cls = "paper" if is_paper_row(r.run) else ""
            trs.append(f"<tr class='{cls}'><td>{html.escape(str(r.run))}</td>{''.join(cells_html)}</tr>")
        md.append("")
        body.append(f"<h2>{html.escape(FAMILY_TITLES.get(fam, fam))}</h2><table><thead><tr>{thead}</tr></thead>"
                    f"<tbody>{''.join(trs)}</tbody></table>")
    md += [f"![{Path(p).stem}]({p})" for p in images] + [""]
    failed = metrics[metrics.metric == "n_failed"]
    md += ["Samples scored (failed predictions count as wrong): " + ", ".join(
        f"{r.run} / {r.benchmark}{(' / ' + r.task) if r.task else ''}: {r.n}"
        + (f" ({int(r.value)} failed)" if r.value else "") for r in failed.itertuples()), ""]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>MA-LMM leaderboard</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
            "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:14px}th{background:#f3f3f3}"
            "td:first-child{text-align:left}.best{font-weight:bold;background:#e6f4ea}.paper{color:#666;"
            "font-style:italic}</style></head><body><h1>MA-LMM leaderboard</h1><p>Scores with 95 % bootstrap "
            "intervals (resampled by video). Grey rows: the paper's published numbers. Green: best run per column."
            f"</p><p class='rule'>{html.escape(rules)}</p>" + "".join(body)
            + "".join(f"<h2>{html.escape(Path(p).stem)}</h2><img src='{html.escape(p)}' width='720'>"
                      for p in images) + "</body></html>")
    return "\n".join(md), page


# ----------------------------------------------------------------------------- plots

def make_plots(metrics: pd.DataFrame, out_dir: Path) -> list[str]:
    """Top-1 per task and run with CI bars; memory / time against frames from reports/bench/model.json."""
    import matplotlib  # heavy: imported on use (only when plots are drawn)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    acc = metrics[metrics.metric.isin(["top1", "cider"])]
    if len(acc):
        groups = list(dict.fromkeys(zip(acc.benchmark, acc.task, acc.metric)))
        runs = list(dict.fromkeys(acc.run))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
        w = 0.8 / max(1, len(runs))
        for j, run in enumerate(runs):
            xs, ys, lo, hi = [], [], [], []
            for i, g in enumerate(groups):
                r = acc[(acc.run == run) & (acc.benchmark == g[0]) & (acc.task == g[1]) & (acc.metric == g[2])]
                if len(r):
                    r = r.iloc[0]
                    xs.append(i + j * w)
                    ys.append(r.value)
                    lo.append(r.value - (r.ci_low if pd.notna(r.ci_low) else r.value))
                    hi.append((r.ci_high if pd.notna(r.ci_high) else r.value) - r.value)
            ax.bar(xs, ys, w, yerr=[lo, hi], capsize=3, label=run)
        ax.set_xticks([i + w * (len(runs) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{b}\n{t} {m}" for b, t, m in groups], fontsize=8)
        ax.set_ylabel("score (top-1 % / CIDEr)")
        ax.set_title("Score by run (95 % bootstrap CI)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_savefig(fig, out_dir / "scores_by_run.png"))
        plt.close(fig)
    bench = next((d / "model.json" for d in (out_dir / "bench", Path(__file__).resolve().parents[1] / "reports"
                                             / "bench") if storage.exists(d / "model.json")), None)
    if bench is not None:
        path = _plot_model_bench(storage.read_json(bench), out_dir, plt)
        if path:
            written.append(path)
    return written


def _plot_model_bench(data: dict, out_dir: Path, plt) -> str | None:
    """Peak memory and time per video against frames, per aggregation (``tests/perf/bench_model.py``)."""
    rows = data.get("inference") or []
    modes = [k for k in (rows[0] if rows else {}) if isinstance(rows[0][k], dict)]
    if not modes:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in modes:
        frames = [r["frames"] for r in rows if mode in r]
        axes[0].plot(frames, [r[mode]["peak_mb"] for r in rows if mode in r], marker="o", label=mode)
        axes[1].plot(frames, [r[mode]["seconds_per_video"] for r in rows if mode in r], marker="o", label=mode)
    for ax, ylabel in zip(axes, ("peak memory per video (MB)", "seconds per video")):
        ax.set_xlabel("frames")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle(f"Streaming one video in chunks of {data.get('chunk', '?')} frames (reports/bench/model.json)")
    fig.tight_layout()
    path = _savefig(fig, out_dir / "memory_vs_frames.png")
    plt.close(fig)
    return path


def _savefig(fig, path: Path) -> str:
    with storage.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return str(path)
