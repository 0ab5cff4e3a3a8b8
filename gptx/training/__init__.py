"""A training run: its plan (every input checked), the Trainer's loop, LR and batch schedules,
guards, metrics and checkpoints."""
