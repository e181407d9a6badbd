"""GPU resources shared between workers: MPS control now; SM partitioning comes here next."""
