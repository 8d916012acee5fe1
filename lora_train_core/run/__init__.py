"""A training run: the orchestrator both doors call, the loop and its step, state, stages, speed."""
