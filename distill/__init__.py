"""One-step distillation: losses (pure functions) now; roles, methods, the accelerate trainer and export next."""
