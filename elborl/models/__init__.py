"""Velocity backbones behind one interface: `encode_prompts(prompts)` and `velocity(x_t, t, cond)`."""

from pathlib import Path


def load_backbone(directory: str | Path):
    """A saved backbone of either family, recognised by what its directory holds."""
    directory = Path(directory)
    if (directory / "shapes_model.json").exists():
        from elborl.models.shapes_model import ShapesFlowModel

        return ShapesFlowModel.from_pretrained(directory)
    if (directory / "model_index.json").exists():
        from elborl.models.sd3 import SD3FlowModel

        return SD3FlowModel.from_pretrained(directory)
    raise FileNotFoundError(f"{directory} holds no model (neither shapes_model.json nor a diffusers model_index.json)")
