"""Distillation stage: token-level KD (forward/reverse KL, generalised JSD) from a teacher into the
compressed student over DeepSpeed ranks, with KCD knowledge condensation and pruning masks kept."""
