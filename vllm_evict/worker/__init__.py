"""Worker side: physical lengths and slots for the model runner, compaction at step boundaries."""
