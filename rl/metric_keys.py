"""The vocabulary of the RL metrics, shared by what logs them (rl/tracking.py) and what reads them
back (launch/report, launch/wandb_layout.py). No imports: the CLI reads it at start-up."""

# Every metric key is `<section>/<name>` with one of these sections (W&B builds its panel sections
# from the prefix), plus ELAPSED.
SECTIONS = ("reward", "response", "loss", "train", "select", "pack", "rollout", "timing", "perf")
# The phases `timing/step` is made of (rl/controller.py's timers), in the order a step runs them;
# `checkpoint` is timed after the step's record is written, so it is outside `timing/step` and lands
# in the next step's record.
STEP_PHASES = ("rollout", "reward", "weight_sync", "pack", "train")
AFTER_STEP_PHASES = ("checkpoint",)
# Wall seconds of the stage at each step, summed over its resumed attempts: the x-axis of the
# reward-against-wall-clock plots (the same field in metrics.jsonl and W&B).
ELAPSED = "time/elapsed_s"
