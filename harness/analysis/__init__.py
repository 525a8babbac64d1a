"""The representation analysis at a run's selected epoch: well profiles, batch-mixing and retrieval metrics, and
the BatchNorm-statistics shift between training and test plates."""
