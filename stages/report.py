"""Stage: the pipeline's report — base vs fine-tuned held-out scores as metrics JSON and plots, and the run
report, one self-contained HTML page (elborl/report.py).

With --metrics and --plots: reads two evaluate artifacts' scores.json, stages.train's per-round metrics JSONL and
optionally the base model's pretrain_log.json; writes --metrics (JSON: base, fine_tuned, delta per task and overall,
training reward of the first and last round, pretraining loss) and under --plots train.csv (per round),
heldout.csv (per task) and their PNGs (rendered with matplotlib, offline).

With --run and --html: the run report of any run (local or s3://), comparing the evaluations whose scores.json
--base and --final name (default: the run's own first and last held-out evaluations)."""

from pathlib import Path

from elborl.plots import write_report
from elborl.report import write_run_report
from elborl.rounds import RunContext
from stages._common import run_stage, stage_parser


def main(args, params) -> None:
    if not (args.metrics or args.plots or args.html):
        raise ValueError("nothing to write: give --metrics and --plots, and/or --run and --html")
    if args.metrics or args.plots:
        missing = [f"--{name.replace('_', '-')}" for name in ("base", "final", "train_metrics", "metrics", "plots")
                   if not getattr(args, name)]
        if missing:
            raise ValueError(f"the metrics and plots need {', '.join(missing)} too")
        metrics = write_report(args.base, args.final, args.train_metrics, args.metrics, args.plots, args.pretrain_log)
        print(f"overall: base {metrics['base']['overall']}  fine-tuned {metrics['fine_tuned']['overall']}"
              f"  -> {args.metrics}, {args.plots}/")
    if args.html:
        if not args.run:
            raise ValueError("the run report (--html) needs --run")
        # an evaluation's scores.json lies in its artifact's directory, beside its per-image records and grid
        before, after = (str(Path(scores).parent) if scores else None for scores in (args.base, args.final))
        path = write_run_report(RunContext(args.run, params, cache=args.cache), args.html, before, after)
        print(f"run report: {path}")


def build_parser(prog: str | None = None):
    parser = stage_parser(__doc__, prog)
    parser.add_argument("--base", default=None, help="the base model's scores.json")
    parser.add_argument("--final", default=None, help="the fine-tuned policy's scores.json")
    parser.add_argument("--train-metrics", default=None, help="stages.train's per-round metrics (JSONL)")
    parser.add_argument("--pretrain-log", default=None, help="the base model's pretrain_log.json (pretraining loss)")
    parser.add_argument("--metrics", default=None, help="metrics JSON to write")
    parser.add_argument("--plots", default=None, help="directory for train.csv, heldout.csv and the PNGs")
    parser.add_argument("--run", default=None, help="the run's prefix (local path or s3://), for --html")
    parser.add_argument("--html", default=None, help="the run report to write (one self-contained HTML file)")
    parser.add_argument("--cache", default=None, help="local cache for s3:// artifacts")
    return parser


if __name__ == "__main__":
    run_stage(main, build_parser())
