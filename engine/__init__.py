"""Everything that runs a prompt: validation, execution, the job queue and its executor, storage."""
