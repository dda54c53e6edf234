"""Knowledge distillation: the losses (``losses``), the objective the training engine trains with
(``objective``), the teacher-output cache (``cache``) and per-task teachers (``teachers``)."""
