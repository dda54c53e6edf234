"""Knowledge distillation: losses (``losses``) and a multi-task distillation loop (``trainer``)."""
