"""Fine-tuning: the training loop, loss, schedules, checkpoints and the `train` command."""
