"""Training: the Trainer and its loop (trainer.py) and the components that own their cadence
and state: checkpoints, validation, metrics and step timing, stopping."""
