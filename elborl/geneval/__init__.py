"""GenEval: prompt metadata, detections and the scoring rules (implemented once, for every detector)."""
