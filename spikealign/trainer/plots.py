"""Figures and the summary table of one or more run directories (``python -m training.plot``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from spikealign.errors import UserError
from spikealign.trainer.config import FC_LAYERS
from spikealign.trainer.rundir import ALIGNMENT_FIGURE, ERROR_FIGURE, RunRecord, write_atomic


def _labels(runs: Sequence[RunRecord]) -> list[str]:
    """Rule names, with the directory name added where two runs share a rule."""
    rules = [run.config.rule for run in runs]
    return [
        f"{rule} ({run.path.name})" if rules.count(rule) > 1 else rule
        for rule, run in zip(rules, runs, strict=True)
    ]


def plot_runs(runs: Sequence[RunRecord], fig_dir: str | Path) -> tuple[Path, Path]:
    """Write error.png (test error or mAP, train dashed) and alignment.png into ``fig_dir``."""
    # matplotlib's object API (Agg canvas): no pyplot, so the caller's backend is left alone.
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig_dir = Path(fig_dir)
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create figure directory {fig_dir} ({err.strerror})") from None
    labels = _labels(runs)
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = [cycle[index % len(cycle)] for index in range(len(runs))]

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for run, label, color in zip(runs, labels, colors, strict=True):
        epochs = [row["epoch"] for row in run.rows]
        test_key = run.score_key
        train_key = test_key.replace("test", "train")
        axes.plot(epochs, [row[test_key] for row in run.rows], color=color, label=f"{label} test")
        axes.plot(epochs, [row[train_key] for row in run.rows], color=color, ls="--", alpha=0.6,
                  label=f"{label} train")  # fmt: skip
    multilabel = [run.multilabel for run in runs]
    ylabel = "mean average precision" if all(multilabel) else "error"
    if any(multilabel) and not all(multilabel):
        ylabel = "error (mAP for multi-label data)"
    axes.set(xlabel="epoch", ylabel=ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize="small")
    error_path = fig_dir / ERROR_FIGURE
    _save_figure(figure, error_path)

    figure = Figure(figsize=(11, 6), layout="constrained")
    axes = figure.subplots(2, len(FC_LAYERS), sharex=True)
    for column, layer in enumerate(FC_LAYERS):
        for run, label, color in zip(runs, labels, colors, strict=True):
            epochs = [row["epoch"] for row in run.rows]
            marker = "." if len(epochs) < 20 else None
            for row_axes, key in zip(axes[:, column], ("angle_deg", "sign_agreement"), strict=True):
                values = [row[f"{layer}_{key}"] for row in run.rows]
                row_axes.plot(epochs, values, color=color, label=label, marker=marker)
        axes[0, column].set_title(layer)
        axes[1, column].set_xlabel("epoch")
        axes[1, column].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylabel("angle between W and Y (deg)")
    axes[1, 0].set_ylabel("sign agreement (%)")
    axes[0, -1].legend(fontsize="small")
    alignment_path = fig_dir / ALIGNMENT_FIGURE
    _save_figure(figure, alignment_path)
    return error_path, alignment_path


def _save_figure(figure, path: Path) -> None:
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=120), binary=True)


def summary_table(runs: Iterable[RunRecord]) -> str:
    """Final figures per run: rule, dataset, epochs, test error (or mAP), fc angle / sign."""
    header = ["run", "rule", "dataset", "epochs", "test score"]
    header += [f"{layer} angle/sign" for layer in FC_LAYERS]
    lines = [header]
    for run in runs:
        if not run.rows:
            lines.append([str(run.path), run.config.rule, run.config.dataset, "0", "-"] + ["-"] * 3)
            continue
        last = run.rows[-1]
        score_name = "mAP" if run.multilabel else "error"
        line = [
            str(run.path),
            run.config.rule,
            run.config.dataset,
            str(last["epoch"]),
            f"{score_name} {last[run.score_key]:.4f}",
        ]
        line += [
            f"{last[f'{layer}_angle_deg']:5.1f} / {last[f'{layer}_sign_agreement']:5.1f}"
            for layer in FC_LAYERS
        ]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
