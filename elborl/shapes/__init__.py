"""The embedded default world: GenEval's task structure over rendered shapes."""
