"""Planning and running a workflow: passes over the stack, streaming batches between reader and writer threads."""
