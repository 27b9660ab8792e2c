"""Training stage: meta-training and pre-training loops, checkpoints, the evaluation protocol."""
