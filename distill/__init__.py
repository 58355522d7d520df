"""One-step distillation trainers (DMD2-style, multi-student, noise-consistency); not built yet."""
