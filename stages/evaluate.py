"""Stage: sample a prompt set with a model, score it with shapes-GenEval, write scores, images list and grid."""

from elborl.evaluate import evaluate, format_table, write_evaluation
from elborl.geneval.prompts import read_jsonl
from elborl.models.shapes_model import ShapesFlowModel
from stages._common import run_stage, stage_parser


def main(args, params) -> None:
    model = ShapesFlowModel.from_pretrained(args.model)
    metas = read_jsonl(args.prompts)
    summary, records, images = evaluate(model, metas, params.evaluate)
    written = write_evaluation(args.out, summary, records, images)
    print(format_table({args.name: summary}))
    print(f"scores: {written['scores']}\ngrid:   {written['grid']}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--model", required=True, help="directory of a saved model")
    parser.add_argument("--prompts", required=True, help="GenEval prompt JSONL")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--name", default="model", help="column name in the printed table")
    run_stage(main, parser)
