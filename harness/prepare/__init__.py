"""Step 1, shards: the Ray jobs that write plate shards (`platebench synth`, `platebench ingest`)."""
