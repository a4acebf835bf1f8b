"""Print what a spike log of the feedback-training phase holds, and optionally plot it.

    python -m sims.inspect runs/phase.h5 [--plot DIR]

Works on a finished log and on a ``.partial`` one (a run cut short or still running), which it
reports as incomplete with the simulated time it reaches. ``--plot DIR`` writes raster.png,
rates.png, alignment.png and criterion.png (the schedule run and the stopping criterion). The
reading and plotting live in :mod:`spikealign.spikelog`.
"""

from __future__ import annotations

from pathlib import Path

from spikealign.errors import OneLineParser, exit_on_user_error
from spikealign.outputs import check_output_dir
from spikealign.spikelog import open_log, plot_alignment, plot_criterion, plot_raster, plot_rates

PLOTS = {
    "raster": plot_raster,
    "rates": plot_rates,
    "alignment": plot_alignment,
    "criterion": plot_criterion,
}
MAX_SEGMENTS_LISTED = 24


def format_summary(summary: dict) -> str:
    """The text printed for a :meth:`SpikeLog.summary` dict."""
    lines = [
        f"log:       {summary['path']}",
        f"format:    {summary['format']} version {summary['version']}, "
        f"created {summary['created']}",
    ]
    if summary["complete"]:
        lines.append(f"status:    complete, simulated until {summary['simulated_until']:.3f} s")
    else:
        lines.append(
            f"status:    INCOMPLETE, ends at {summary['simulated_until']:.3f} s of simulated time "
            "(run cut short or still running)"
        )
    names = [layer["name"] for layer in summary["layers"]]
    lines.append(
        f"network:   sizes {'-'.join(str(size) for size in summary['sizes'])} "
        f"({names[0]}..{names[-1]}), dt {summary['dt'] * 1e3:g} ms, seed {summary['seed']}"
    )

    lines.append("layers:")
    lines.append(
        f"  {'layer':<6}{'size':>6}{'spikes':>11}{'sim_s':>9}{'mean_Hz':>9}{'max_Hz':>9}"
        "   windows/neuron mean  min  max  spiked"
    )
    for layer in summary["layers"]:
        row = (
            f"  {layer['name']:<6}{layer['size']:>6}{layer['spikes']:>11}"
            f"{layer['simulated_s']:>9.1f}{layer['mean_rate_hz']:>9.2f}{layer['max_rate_hz']:>9.2f}"
        )
        windows = layer["windows"]
        if windows is None:
            row += "   no windows"
        else:
            row += (
                f"   {windows['per_neuron_mean']:>19.1f}{windows['per_neuron_min']:>5}"
                f"{windows['per_neuron_max']:>5}{100 * windows['share_spiked']:>7.1f}%"
            )
        lines.append(row)

    segments = summary["schedule"]
    per_layer: dict[str, float] = {}
    for segment in segments:
        per_layer[segment["layer"]] = per_layer.get(segment["layer"], 0.0) + (
            segment["end"] - segment["start"]
        )
    driven = ", ".join(f"{layer} {seconds:g} s" for layer, seconds in per_layer.items())
    # a segment that drove several layers has one row per layer, with equal start and end
    grouped: dict[tuple[float, float], list[str]] = {}
    for segment in segments:
        grouped.setdefault((segment["start"], segment["end"]), []).append(segment["layer"])
    lines.append(
        f"schedule:  {summary['schedule_kind'] or 'unknown'}, {len(grouped)} segments"
        + (f" (driven: {driven})" if driven else "")
    )
    listed = list(grouped.items())
    if len(listed) > MAX_SEGMENTS_LISTED:
        half = MAX_SEGMENTS_LISTED // 2
        listed = listed[:half] + [None] + listed[-half:]
    for entry in listed:
        if entry is None:
            lines.append(f"  ... {len(grouped) - 2 * half} more ...")
        else:
            (start, end), layers = entry
            lines.append(f"  {start:9.3f} - {end:9.3f} s  {' + '.join(layers)} driven")

    criterion = summary["criterion"]
    if criterion:
        lines.append("criterion (predicted sign agreement % after each segment):")
        for fc in dict.fromkeys(record["fc"] for record in criterion):
            values = [r for r in criterion if r["fc"] == fc]
            trail = ", ".join(
                f"{r['time']:g} s {r['predicted_sign_agreement']:.1f}" for r in values[-6:]
            )
            more = f"({len(values) - 6} earlier) ... " if len(values) > 6 else ""
            lines.append(f"  {fc}: {more}{trail}")
    else:
        lines.append("criterion: none recorded (estimator lms, or a version 1 log)")

    lines.append("alignment (first -> last):")
    for fc, records in summary["alignment"].items():
        if records is None:
            lines.append(f"  {fc}: no records")
            continue
        first, last = records["first"], records["last"]
        lines.append(
            f"  {fc}: t {first['time']:.1f} -> {last['time']:.1f} s, "
            f"angle {first['angle_deg']:.1f} -> {last['angle_deg']:.1f} deg, "
            f"sign agreement {first['sign_agreement']:.1f} -> {last['sign_agreement']:.1f} %, "
            f"norm ratio {first['norm_ratio']:.3f} -> {last['norm_ratio']:.3f}"
        )
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m sims.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="spike log (.h5, or .h5.partial of a cut-off run)")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG plots into DIR")
    args = parser.parse_args(argv)
    check_output_dir(args.plot, "--plot")
    with open_log(args.log) as log:
        print(format_summary(log.summary()))
        if args.plot is not None:
            args.plot.mkdir(parents=True, exist_ok=True)
            for name, plot in PLOTS.items():
                print(f"wrote {plot(log, args.plot / f'{name}.png')}")


if __name__ == "__main__":
    main()
