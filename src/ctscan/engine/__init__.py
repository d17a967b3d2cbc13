"""Training, evaluation, metrics, plots, checkpoints and the runtime set-up."""
