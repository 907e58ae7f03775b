"""Distillation: the objective (loss terms, teachers, modes), the teacher-output cache,
feature taps and adapters, and the diagnostics of a teacher."""
