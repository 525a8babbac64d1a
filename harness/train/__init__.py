"""Steps 2, 3, 5 and 6: run specs and their identity, jobs and Ray Train lanes, the training loop, evaluation,
checkpoints, and the MLflow mirror of what a run writes."""
