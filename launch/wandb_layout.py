"""The saved W&B workspace for prunerl runs: where the time went, and what each method saved.

Sections, in order:
- `speedup` (open): reward and accuracy against wall-clock seconds (`time/elapsed_s`) and against
  the step, seconds per step, the completion tokens the learner skipped, and each run's wall time.
  The runs are grouped by W&B group, which is the recipe's name (rl/tracking.py), so a GRPO, a CPPO
  and a DPPO recipe are three lines: same reward per step, less wall clock per reward.
- one per metric family of rl/metric_keys.py SECTIONS, a line plot per metric against the step;
  `timing` adds the step's phases stacked (the seconds of one step, by phase), `rollout` the
  truncated rollouts' metrics (Step-GRPO recipes only: empty panels otherwise);
- `eval`: the eval stages' comparison table and sampled completions (evaluation/table.py).

Built with wandb-workspaces, W&B's own library for saved views. Every key a panel plots must be
one a run logs: tests/test_e2e.py checks them against an offline run's history.
`prunerl wandb-layout --entity E --project P` prints the view as JSON; `--save` writes it to W&B.
"""
from __future__ import annotations

import json
import sys

from rl.metric_keys import AFTER_STEP_PHASES, ELAPSED, SECTIONS, STEP_PHASES
from rollout.truncation import EXIT_REASONS

WORKSPACE_NAME = "prunerl: where the time went"
SECTION_METRICS: dict[str, tuple[str, ...]] = {
    "reward": ("reward/mean", "reward/accuracy", "reward/std", "reward/timeouts", "reward/errors", "reward/rejected"),
    "response": ("response/length_mean", "response/truncated_frac", "response/steps_mean",
                 "response/steps_per_correct", "response/tokens_per_correct"),
    "loss": ("loss/total", "loss/policy", "loss/kl"),
    "train": ("train/grad_norm", "train/entropy", "train/clip_frac", "train/lr", "train/tokens", "train/rows"),
    "select": ("select/kept_frac", "select/tokens_saved", "select/prompts_skipped"),
    "pack": ("pack/padding_frac",),
    "rollout": ("rollout/tokens", "rollout/staleness", "rollout/mismatch_kl", "rollout/is_weight_mean"),
    "timing": ("timing/step", *(f"timing/{phase}" for phase in (*STEP_PHASES, *AFTER_STEP_PHASES))),
    "perf": ("perf/tokens_per_s",),
}
# Logged by Step-GRPO's truncated rollouts only.
TRUNCATION_METRICS = (*(f"rollout/exit_{reason}" for reason in EXIT_REASONS), "rollout/probes_mean",
                      "rollout/inserted_frac")
# The phases of a step, stacked: what `timing/step` is made of (checkpoints are timed outside it).
STACKED_PHASES = tuple(f"timing/{phase}" for phase in (*STEP_PHASES, *AFTER_STEP_PHASES))
EVAL_TABLES = ("eval/table", "eval/completions")


def build_workspace(entity: str, project: str, name: str = WORKSPACE_NAME):
    """The workspace (a `wandb_workspaces.workspaces.Workspace`); nothing is sent until `.save()`."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    def lines(keys, x: str = "Step") -> list:
        return [wr.LinePlot(title=key, x=x, y=[key]) for key in keys]

    speedup = [
        wr.LinePlot(title="reward vs wall clock", x=ELAPSED, y=["reward/mean"], title_x="seconds"),
        wr.LinePlot(title="accuracy vs wall clock", x=ELAPSED, y=["reward/accuracy"], title_x="seconds"),
        wr.BarPlot(title="wall seconds per run", metrics=[ELAPSED]),
        wr.LinePlot(title="reward vs step", y=["reward/mean"]),
        wr.LinePlot(title="seconds per step", y=["timing/step"]),
        wr.LinePlot(title="completion tokens the learner skipped", y=["select/tokens_saved"]),
    ]
    timing = [wr.LinePlot(title="seconds per step, by phase", y=list(STACKED_PHASES), plot_type="stacked-area"),
              *lines(SECTION_METRICS["timing"])]
    panels = {section: lines(SECTION_METRICS[section]) for section in SECTIONS}
    panels["timing"] = timing
    panels["rollout"] += lines(TRUNCATION_METRICS)
    eval_tables = [wr.WeavePanelSummaryTable(table_name=key, layout=wr.Layout(w=24, h=12)) for key in EVAL_TABLES]
    sections = [ws.Section(name="speedup", panels=speedup, is_open=True),
                *(ws.Section(name=section, panels=panels[section], is_open=section in ("reward", "timing"))
                  for section in SECTIONS),
                ws.Section(name="eval", panels=eval_tables, is_open=True)]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        runset_settings=ws.RunsetSettings(groupby=[expr.Metric("Group")]))


def referenced_metrics(workspace) -> set[str]:
    """Every history key the workspace's plots read (the x-axis "Step" aside)."""
    keys = set()
    for section in workspace.sections:
        for panel in section.panels:
            keys.update(getattr(panel, "y", None) or getattr(panel, "metrics", None) or [])
            if getattr(panel, "x", "Step") != "Step":
                keys.add(panel.x)
    return keys


def referenced_tables(workspace) -> set[str]:
    return {panel.table_name for section in workspace.sections for panel in section.panels
            if hasattr(panel, "table_name")}


def view_json(workspace) -> str:
    """The view as `save()` sends it (wandb-workspaces' own serialisation)."""
    return json.dumps(workspace._to_model().model_dump(mode="json", by_alias=True, exclude_none=True), indent=1)


def cmd_wandb_layout(args) -> int:
    import wandb

    workspace = build_workspace(args.entity, args.project, args.name)
    if not args.save:
        print(view_json(workspace))
        return 0
    try:
        workspace.save()
    except wandb.Error as e:  # no API key, a wrong one, no network, no such entity or project
        print(f"[prunerl] wandb-layout --save: the workspace was not saved: {type(e).__name__}: {e} (saving needs "
              "network access to W&B and an API key: `wandb login` or WANDB_API_KEY)", file=sys.stderr)
        return 1
    print(f"[prunerl] saved the workspace: {workspace.url}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("wandb-layout", help="print (or --save to W&B) the workspace layout for prunerl runs")
    p.add_argument("--entity", required=True, help="W&B entity (user or team) that owns the project")
    p.add_argument("--project", required=True, help="W&B project the runs log to (logging.wandb.project)")
    p.add_argument("--name", default=WORKSPACE_NAME, help="the saved view's name")
    p.add_argument("--save", action="store_true", help="write it to W&B (network and an API key) instead of printing it")
    p.set_defaults(fn=cmd_wandb_layout)
