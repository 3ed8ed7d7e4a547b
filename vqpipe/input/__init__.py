"""Input stage: shard URLs -> streamed tar members -> samples -> preprocessed images."""
