"""GenEval's dense partial-credit reward (METHOD.md §8) over any detector behind the scorer."""

import numpy as np

from elborl.geneval.scoring import GenEvalScorer


class GenEvalReward:
    def __init__(self, scorer: GenEvalScorer):
        self.scorer = scorer

    def __call__(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        return np.array([s.reward for s in self.scorer.score(images, metas)], dtype=np.float32)


def shapes_geneval_reward() -> GenEvalReward:
    from elborl.evaluate import shapes_scorer

    return GenEvalReward(shapes_scorer())
