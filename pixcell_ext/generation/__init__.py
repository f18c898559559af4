"""Generating a class-organised synthetic set: the work list, the run configuration, the sampling pipeline and the
manifest. It reads a training run's directory (so it sits above `training`); `evaluation` reads its manifest."""
