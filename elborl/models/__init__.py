"""Velocity backbones behind one interface: `encode_prompts(prompts)` and `velocity(x_t, t, cond)`."""
