import pytest
import torch

from elborl.models.shapes_model import ShapesFlowModel, ShapesModelConfig

TINY = ShapesModelConfig(channels=(32, 32), text_width=32, text_layers=1)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def tiny_model() -> ShapesFlowModel:
    return ShapesFlowModel.from_config(TINY, seed=0).eval()
