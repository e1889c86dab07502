"""Velocity backbones behind one interface: `encode_prompts(prompts)` and `velocity(x_t, t, cond)`."""

from pathlib import Path

from elborl.runtime import place


def load_backbone(directory: str | Path, runtime=None):
    """A saved backbone of either family, recognised by what its directory holds; placed by `runtime` (a
    RuntimeConfig: device, TF32, gradient checkpointing) when given."""
    directory = Path(directory)
    if (directory / "shapes_model.json").exists():
        from elborl.models.shapes_model import ShapesFlowModel

        return place(ShapesFlowModel.from_pretrained(directory), runtime)
    if (directory / "model_index.json").exists():
        from elborl.models.sd3 import SD3FlowModel

        return place(SD3FlowModel.from_pretrained(directory), runtime)
    raise FileNotFoundError(f"{directory} holds no model (neither shapes_model.json nor a diffusers model_index.json)")
