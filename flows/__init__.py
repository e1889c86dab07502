"""Prefect 3 orchestration of the ELBO-RL stages (docs/prefect.md).

    flows/training.py    train_rounds      rounds of rollout -> score -> update from the first incomplete round
    flows/evaluation.py  evaluate_models   the base model and/or a round's EMA policy on the held-out prompts
    flows/campaign.py    campaign          prepare prompts -> pretrain -> train -> evaluate -> publish metrics
    flows/common.py      the stage tasks: one command line per stage, run in-process or as a (container) job

Every stage publishes its artifact through `elborl.store` and is skipped when that artifact is already
published, so a flow run that is killed or fails resumes at the first unfinished stage when it runs again.

Offline by default: importing this package before Prefect sets (unless already set) PREFECT_HOME to the
project's git-ignored `.prefect/`, turns Prefect's and the server's telemetry off and gives the ephemeral
server 90 s to start (the 20 s default is too tight on a busy 2-core machine). Workers and `prefect` CLI
commands import Prefect first: export the same variables in their environment (docs/prefect.md).
"""

from pathlib import Path
import os

PROJECT_ROOT = Path(__file__).resolve().parent.parent

OFFLINE_SETTINGS = {
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}

for _name, _value in OFFLINE_SETTINGS.items():
    os.environ.setdefault(_name, _value)
