"""Overlay training runs: ``python -m training.plot RUN_DIR [RUN_DIR ...] [--out FIG_DIR]``.

Writes ``error.png`` (test error, or mAP for VOC, against epoch; train dashed) and
``alignment.png`` (angle between W and Y and sign agreement of fc1..fc3 against epoch), one line per
run labelled by its rule, into FIG_DIR (default: the current directory), and prints the final
figures of every run as a table.
"""

from __future__ import annotations

from spikealign import trainer
from spikealign.errors import OneLineParser, exit_on_user_error
from spikealign.outputs import check_output_dir


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m training.plot",
        description="Plot test error and fc alignment of training runs against epoch.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out directories of runs")
    parser.add_argument("--out", default=".", help="directory for the figures (default .)")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_output_dir(args.out, "--out")
    runs = [trainer.read_run(path) for path in args.runs]
    error_path, alignment_path = trainer.plot_runs(runs, args.out)
    print(trainer.summary_table(runs))
    print(f"figures: {error_path} {alignment_path}")


if __name__ == "__main__":
    main()
