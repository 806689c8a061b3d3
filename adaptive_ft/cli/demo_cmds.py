"""``adaptive-ft demo``: the whole pipeline on the embedded default."""

from __future__ import annotations

import click

from adaptive_ft.cli.common import config_option, overrides_argument


@click.command()
@click.option("--quick", is_flag=True, help="A tiny model built in-process instead of SmolLM2 (about a minute).")
@click.option("--pool", type=click.Choice(["builtin", "banking77"]), default="builtin", show_default=True,
              help="Example pool: the built-in support requests, or Banking77 from ../shared/data.")
@click.option("--out", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Work folder for every artifact (logs, store, plan, run, export, eval, report).")
@config_option
@overrides_argument
def demo(quick: bool, pool: str, out: str, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Run the loop end to end: a deployed v1, its users' feedback, a targeted v2 audited against v1.

    Fine-tunes v1 on a skewed launch mix (good where it launched, weak on two domains it barely saw),
    lets simulated users of several segments ask it -- its own wrong answers draw the thumbs-down,
    escalations and edits -- then prioritizes from those logs, trains v2 from v1's adapter on the plan,
    exports merged / int8 / nf4 / GGUF, evaluates v1 vs v2 vs quantized per segment and domain, and writes
    an HTML report with the v1 -> v2 view. With SmolLM2-135M-Instruct it takes under 10 minutes on 2 CPU
    cores. A folder the demo did not make is never emptied: pass a new one.

    \b
    Examples:
      adaptive-ft demo                       # SmolLM2-135M-Instruct, built-in pool
      adaptive-ft demo --quick               # tiny in-process model, ~1 minute
      adaptive-ft demo --pool banking77 --out b77 train.max_steps=100
      adaptive-ft demo --out d2 seed=2 prioritize.replay=0.3   # other weak domains, another replay share
    """
    from adaptive_ft.demo import run_demo  # deferred: the stage imports torch; --help stays fast

    result = run_demo(out, quick=quick, pool=pool, config=config_path, overrides=overrides)
    total = sum(result.timings.values())
    click.echo("")
    click.secho(f"Report: {result.report}", bold=True)
    for line in result.summary:
        click.echo("  " + line)
    click.echo(f"  ({total:.0f} s in all: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items()) + ")")


COMMANDS = [demo]
