"""Stage: sample held-out prompts (images_per_prompt images each), score them, publish the scores.

The model is the base model, or with --policy-state a round's update artifact evaluated with its EMA weights,
or with --run the update of the run's last completed round (the final policy; what DVC's pipeline evaluates).
The prompts are a prompt-set artifact (--prompts, --prompt-file) or a registered held-out set (--prompt-set:
shapes_geneval, geneval, ocr, drawbench). The score is GenEval's strict score (evaluate.scorer: the shapes
world's detector, or GenEval's own on real images), or with --metrics any
rewards of elborl.rewards by name (model weights from the params file's rewards.paths), averaged per task.
Publishes scores.json and scores.md (per task and overall), images.jsonl (per image) and grid.png at --out.
Data parallel when launched with several processes (`accelerate launch`, `torchrun`): each samples and scores
its share of the images, the main process publishes."""

import contextlib

from elborl.checkpoint import read_state
from elborl.distributed import Processes
from elborl.evaluate import evaluate, evaluate_metrics, format_table, held_out_scorer, write_evaluation
from elborl.geneval.prompts import read_jsonl
from elborl.models import load_backbone
from elborl.policy import Policy
from elborl.prompt_sets import PROMPT_SETS, prompt_set
from elborl.rewards import check_reward_name, configured_reward
from elborl.rounds import RunContext, round_uri
from elborl.store import ArtifactStore
from stages._common import run_stage, stage_parser

DATA_PARALLEL = True  # several processes share the stage's work (elborl/distributed.py)


def final_policy_state(run: str, params, cache: str | None = None) -> str:
    """The update artifact of the run's last completed round."""
    done = RunContext(run, params, cache=cache).completed_rounds()
    if not done:
        raise ValueError(f"{run}: no completed round to evaluate")
    return round_uri(run, done - 1, "update")


def main(args, params) -> None:
    processes = Processes.from_environment()
    policy_state = final_policy_state(args.run, params, args.cache) if args.run else args.policy_state
    names = [name.strip() for name in (args.metrics or "").split(",") if name.strip()]
    for name in names:
        check_reward_name(name, "--metrics")
    store = ArtifactStore()

    def write(directory):  # every process samples and scores its share; the main process writes
        summary, records, images = held_out_evaluation(args, params, store, policy_state, names, processes)
        if processes.is_main:
            write_evaluation(directory, summary, records, images)
            print(format_table(summary["metrics"] if names else {args.name: summary}))

    meta = {"stage": "evaluate", "model": args.model, "policy_state": policy_state,
            "prompts": args.prompt_set or args.prompts, "metrics": names or ["geneval_strict"]}
    processes.publish(store, args.out, write, meta)


def held_out_evaluation(args, params, store, policy_state, names, processes):
    """(summary, records, images) of the model (with the policy's EMA weights) on the prompts; every process
    samples and scores its share of the images."""
    model = load_backbone(store.local_artifact(args.model, args.cache), params.runtime)
    if args.prompt_set:
        metas = prompt_set(args.prompt_set)
    else:
        metas = read_jsonl(store.local_artifact(args.prompts, args.cache) / args.prompt_file)
    weights = contextlib.nullcontext()
    if policy_state:
        print(f"policy: EMA weights of {policy_state}")
        policy = Policy(model, params.policy)
        read_state(store.local_artifact(policy_state, args.cache), policy)
        weights = policy.ema_weights()
    with weights:
        if names:
            metrics = {name: configured_reward(name, params.rewards) for name in names}
            return evaluate_metrics(model, metas, params.evaluate, metrics, processes=processes)
        scorer = held_out_scorer(params.evaluate, params.rewards)
        return evaluate(model, metas, params.evaluate, scorer, processes=processes)


def build_parser(prog: str | None = None):
    parser = stage_parser(__doc__, prog)
    parser.add_argument("--model", required=True, help="artifact URI of the base model")
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--policy-state", default=None, help="artifact URI of a round's update (EMA weights used)")
    policy.add_argument("--run", default=None, help="a run's prefix: evaluate its last completed round's update")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", default=None, help="artifact URI of the prompt sets")
    prompts.add_argument("--prompt-set", default=None, choices=sorted(PROMPT_SETS), help="a registered held-out set")
    parser.add_argument("--prompt-file", default="test.jsonl", help="file in the prompts artifact")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated reward names, e.g. clipscore,aesthetic (default: shapes-GenEval strict)")
    parser.add_argument("--out", required=True, help="artifact URI (local path or s3://) for the scores and grid")
    parser.add_argument("--name", default="model", help="column name in the printed table")
    parser.add_argument("--cache", default=None, help="local cache for s3:// artifacts")
    return parser


if __name__ == "__main__":
    run_stage(main, build_parser(), data_parallel=DATA_PARALLEL)
