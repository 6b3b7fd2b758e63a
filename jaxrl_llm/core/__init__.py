"""The RL math: pure functions over arrays, no model, no I/O."""
