"""Stage: the pipeline's report — base vs fine-tuned held-out scores as metrics JSON, and plots.

Reads two evaluate artifacts' scores.json, stages.train's per-round metrics JSONL and optionally the base model's
pretrain_log.json; writes --metrics (JSON: base, fine_tuned, delta per task and overall, training reward of the
first and last round, pretraining loss) and under --plots
train.csv (per round), heldout.csv (per task) and their PNGs (rendered with matplotlib, offline)."""

from elborl.plots import write_report
from stages._common import run_stage, stage_parser


def main(args, params) -> None:
    metrics = write_report(args.base, args.final, args.train_metrics, args.metrics, args.plots, args.pretrain_log)
    print(f"overall: base {metrics['base']['overall']}  fine-tuned {metrics['fine_tuned']['overall']}"
          f"  -> {args.metrics}, {args.plots}/")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--base", required=True, help="the base model's scores.json")
    parser.add_argument("--final", required=True, help="the fine-tuned policy's scores.json")
    parser.add_argument("--train-metrics", required=True, help="stages.train's per-round metrics (JSONL)")
    parser.add_argument("--pretrain-log", default=None, help="the base model's pretrain_log.json (pretraining loss)")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--plots", required=True, help="directory for train.csv, heldout.csv and the PNGs")
    run_stage(main, parser)
