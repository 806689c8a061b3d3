"""``adaptive-ft prioritize`` (write plan.json from the store) and ``adaptive-ft plan show`` (read one)."""

from __future__ import annotations

from pathlib import Path

import click

from adaptive_ft.artifacts.plan import Plan
from adaptive_ft.cli.common import config_option, overrides_argument, store_option
from adaptive_ft.config import load_config


@click.command("prioritize")
@store_option
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="plan.json to write.")
@click.option("--model", default=None,
              help="Also probe and select adapter layers on this model ('smollm2', HF id, folder or .gguf).")
@click.option("--seed", type=int, default=None, help="Random seed (overrides the config's seed).")
@click.option("--quiet", is_flag=True, help="Only print the plan's path.")
@config_option
@overrides_argument
def prioritize_cmd(store: str, out: Path, model: str | None, seed: int | None, quiet: bool, config_path: str | None,
                   overrides: tuple[str, ...]) -> None:
    """Score domains, examples (and layers) by collaborative filtering; write plan.json.

    Demand comes from an implicit-feedback factorization of the user x example matrix, failure from
    negative feedback smoothed over look-alike examples; priority = sum over segments of weight x demand x
    failure. With --model, a fraction of the domain x layer cells is probed and the rest completed.

    \b
    Examples:
      adaptive-ft prioritize --out plan.json
      adaptive-ft prioritize --store logs.duckdb --out plan.json prioritize.algorithm=bpr
      adaptive-ft prioritize --out plan.json --model smollm2 prioritize.layers_k=6
      adaptive-ft plan show plan.json
    """
    from adaptive_ft.prioritize import prioritize  # deferred: the stage imports torch; --help stays fast

    cfg = load_config(config_path, overrides)
    if seed is not None:
        cfg.seed = seed
    result = prioritize(store, cfg, out, model=model, progress=not quiet)
    if quiet:
        click.echo(str(result.path))
        return
    click.echo(render_plan(result.plan, top=10))
    for note in result.notes:
        click.echo(f"note: {note}")
    took = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    click.echo(f"wrote {result.path} ({took})")


@click.group("plan")
def plan_group() -> None:
    """Read plan.json files.

    \b
    Examples:
      adaptive-ft plan show plan.json
    """


@plan_group.command("show")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--top", type=int, default=0, show_default=True, help="Show only the first N domains (0 = all).")
def plan_show(path: Path, top: int) -> None:
    """Print a plan as a table: domains with priority, demand, failure, share and why; layers; metrics.

    \b
    Examples:
      adaptive-ft plan show plan.json
      adaptive-ft plan show plan.json --top 5
    """
    click.echo(render_plan(Plan.load(path), top=top))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_plan(plan: Plan, top: int = 0) -> str:
    """The plan as plain text: a domain table with a one-line why each, layers, segments, recommender."""
    doms = plan.domains[:top] if top else plan.domains
    lines = [f"{'#':>3}  {'domain':<24} {'priority':>9} {'demand':>7} {'failure':>7} {'share':>6}  why"]
    for i, d in enumerate(doms, 1):
        lines.append(f"{i:>3}  {d.domain[:24]:<24} {d.priority:>9.4f} {_pct(d.demand):>7} {_pct(d.failure):>7} "
                     f"{_pct(d.share):>6}  {d.why}")
    if top and len(plan.domains) > top:
        lines.append(f"     ... {len(plan.domains) - top} more domains")
    if plan.segments:
        lines.append("")
        lines.append("segments: " + ", ".join(
            f"{s['segment']} (weight {_pct(s.get('weight'))}, traffic {_pct(s.get('traffic_share'))}, "
            f"failure {_pct(s.get('failure'))})" for s in plan.segments))
    lines += _render_layers(plan) + _render_recommender(plan.recommender)
    ex = plan.example_weights()
    if ex.height:
        lines.append(f"examples: {ex.height:,} weighted; largest weight {ex['weight'].max():.4f}")
    inputs = plan.inputs
    if inputs:
        lines.append(f"inputs: store {str(inputs.get('store', '-'))[:12]}, config {str(inputs.get('config', '-'))[:12]}, "
                     f"seed {inputs.get('seed', '-')}")
    return "\n".join(lines)


def _render_layers(plan: Plan) -> list[str]:
    lay = plan.layers
    if lay is None:
        return ["", "layers: all (no layer selection in this plan)"]
    out = ["", f"layers selected: {lay.selected}" + (f"  rank_pattern {lay.rank_pattern}" if lay.rank_pattern else "")]
    if lay.scores:
        completed = any(not s.get("measured") for s in lay.scores)
        out.append("  " + "  ".join(
            f"{s['layer']}:{s['score']:.2f}{'' if s.get('measured') else '*'}" for s in lay.scores)
            + ("   (* = partly completed, not all cells measured)" if completed else "   (every cell measured)"))
    return out


def _render_recommender(rec: dict) -> list[str]:
    if not rec or "model" not in rec:
        return ["", f"recommender: {rec.get('note', 'not measured') if rec else 'not measured'}"]
    k = rec.get("k", 10)
    out = ["", f"recommender ({rec.get('algorithm', '?')}, time hold-out, {rec.get('users_evaluated', 0):,} users):"]
    for name in ("model", "popularity"):
        o = rec[name]["overall"]
        out.append(f"  {name:<10} precision@{k} {o.get('precision', 0):.3f}  recall@{k} {o.get('recall', 0):.3f}  "
                   f"NDCG@{k} {o.get('ndcg', 0):.3f}  MAP@{k} {o.get('map', 0):.3f}  coverage {o.get('coverage', 0):.3f}")
    return out


COMMANDS = [prioritize_cmd, plan_group]
