"""Training: the typed config and recipes, the optimizer, the jitted train step, the loop,
checkpoints, validation, tracking and the run folder's lock."""
