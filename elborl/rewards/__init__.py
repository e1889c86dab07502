"""Rewards: callables (images uint8 N x H x W x 3, prompt metadata) -> per-image rewards, by name."""


def _shapes_geneval():
    from elborl.rewards.geneval import shapes_geneval_reward

    return shapes_geneval_reward()


REWARDS = {"shapes_geneval": _shapes_geneval}


def make_reward(name: str):
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; expected one of {sorted(REWARDS)}")
    return REWARDS[name]()
