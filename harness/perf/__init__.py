"""`platebench perf ...`: throughput and overhead figures, each a ratio against a baseline measured in the same run."""
