"""Stage: sample held-out prompts (4 images each), score them with shapes-GenEval, publish the scores.

The model is the base model, or with --policy-state a round's update artifact evaluated with its EMA weights.
Publishes scores.json (per task and overall), images.jsonl (per image) and grid.png at --out."""

from elborl.checkpoint import read_state
from elborl.evaluate import evaluate, format_table, write_evaluation
from elborl.geneval.prompts import read_jsonl
from elborl.models import load_backbone
from elborl.policy import Policy
from stages._common import fetch, publish, run_stage, stage_parser


def main(args, params) -> None:
    def write(directory):
        model = load_backbone(fetch(args.model, args.cache))
        metas = read_jsonl(fetch(args.prompts, args.cache) / args.prompt_file)
        if args.policy_state:
            policy = Policy(model, params.policy)
            read_state(fetch(args.policy_state, args.cache), policy)
            with policy.ema_weights():
                summary, records, images = evaluate(model, metas, params.evaluate)
        else:
            summary, records, images = evaluate(model, metas, params.evaluate)
        write_evaluation(directory, summary, records, images)
        print(format_table({args.name: summary}))

    publish(args.out, write, {"stage": "evaluate", "model": args.model, "policy_state": args.policy_state})


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--model", required=True, help="artifact URI of the base model")
    parser.add_argument("--policy-state", default=None, help="artifact URI of a round's update (EMA weights used)")
    parser.add_argument("--prompts", required=True, help="artifact URI of the prompt sets")
    parser.add_argument("--prompt-file", default="test.jsonl", help="file in the prompts artifact")
    parser.add_argument("--out", required=True, help="artifact URI (local path or s3://) for the scores and grid")
    parser.add_argument("--name", default="model", help="column name in the printed table")
    parser.add_argument("--cache", default=None, help="local cache for s3:// artifacts")
    run_stage(main, parser)
