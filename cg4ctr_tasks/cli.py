"""`cg4ctr`: the one entry point for every stage, used by users, `dvc.yaml` and the DAGs.

Commands stay thin: they open a workspace, call one library function and print its figures
(a table, or JSON with ``--json``). User errors are one line on stderr and exit code 2; heavy
libraries are imported inside commands so that ``--help`` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.workspace import WORKSPACE_ENV, Workspace

app = typer.Typer(
    help="Self-cycling creative generation for CTR (CG4CTR): stages, the simulated world, demo.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
sim_app = typer.Typer(
    help="The embedded simulated world (items, oracle, click simulator).", no_args_is_help=True
)
params_app = typer.Typer(help="Inspect the resolved parameters.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")
app.add_typer(params_app, name="params")

console = Console(stderr=False)

WorkspaceOpt = Annotated[
    Path,
    typer.Option(
        "--workspace",
        "-w",
        envvar=WORKSPACE_ENV,
        help="Workspace folder (params.yaml, data/, models/, sim/).",
        file_okay=False,
    ),
]
ProfileOpt = Annotated[
    str | None, typer.Option("--profile", help="Params profile (default: params.yaml's).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")]


def _open(workspace: Path, profile: str | None = None) -> Workspace:
    return Workspace.open(workspace, profile=profile)


def _emit(figures: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(figures, indent=2, sort_keys=True))
        return
    table = Table(title=title, show_header=False)
    for key, value in figures.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
        table.add_row(key, shown)
    console.print(table)


@params_app.command("show")
def params_show(workspace: WorkspaceOpt = Path("."), profile: ProfileOpt = None) -> None:
    """Print the fully resolved parameters (defaults + workspace params.yaml + profile)."""
    ws = _open(workspace, profile)
    typer.echo(json.dumps(ws.params.model_dump(exclude={"profiles"}), indent=2))


@sim_app.command("init")
def sim_init(
    workspace: WorkspaceOpt = Path("."),
    seed: Annotated[int | None, typer.Option(help="World seed (default: params seed).")] = None,
    items: Annotated[int | None, typer.Option(help="Number of items (default: params).")] = None,
    days: Annotated[int | None, typer.Option(help="Days of click history.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild a world that differs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build (or reuse) a reproducible simulated world in the workspace."""
    from cg4ctr_tasks.sim.world import init_world

    ws = _with_world_overrides(_open(workspace), items, days)
    summary = init_world(ws, seed if seed is not None else ws.params.seed, force=force)
    _emit(summary.as_dict(), as_json, f"simulated world in {ws.root}")


def _with_world_overrides(ws: Workspace, items: int | None, days: int | None) -> Workspace:
    from cg4ctr_tasks.params import load_params

    world: dict[str, Any] = {}
    if items is not None:
        world["items"] = items
    if days is not None:
        world["days"] = days
    if not world:
        return ws
    params = load_params(ws.root / "params.yaml", ws.params.profile, overrides={"world": world})
    return Workspace(root=ws.root, params=params)


@sim_app.command("evaluate")
def sim_evaluate(
    creatives: Annotated[Path, typer.Option(help="Parquet with item_id, image_uri[, user_group].")],
    workspace: WorkspaceOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """True mean CTR of a set of creatives, from the world's hidden oracle."""
    from cg4ctr_tasks import storage
    from cg4ctr_tasks.sim.world import evaluate_creatives

    ws = _open(workspace)
    if not storage.exists(creatives):
        raise UserError(f"creatives table not found: {creatives}")
    _emit(evaluate_creatives(ws, storage.read_parquet(creatives)), as_json, "true CTR")


@app.command("ingest")
def ingest_cmd(
    date: Annotated[str | None, typer.Option("--date", help="One date, YYYY-MM-DD.")] = None,
    start: Annotated[str | None, typer.Option(help="First date of a backfill.")] = None,
    end: Annotated[str | None, typer.Option(help="Last date of a backfill (inclusive).")] = None,
    logs: Annotated[
        str | None,
        typer.Option(help="Folder or s3://bucket/prefix holding dt=YYYY-MM-DD/ partitions."),
    ] = None,
    pending: Annotated[
        bool, typer.Option("--pending", help="Every partition present (new ones ingested).")
    ] = False,
    force: Annotated[bool, typer.Option(help="Re-ingest dates whose outputs are current.")] = False,
    workspace: WorkspaceOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Validate and aggregate click logs into data/ctr/; rejected rows go to data/quarantine/."""
    from cg4ctr_tasks.ingest import ingest

    chosen = sum([date is not None, start is not None, pending])
    if chosen != 1 or (end is not None and start is None):
        raise UserError("give exactly one of --date D, --start S [--end E] or --pending")
    first = date or start
    _emit(ingest(_open(workspace), first, end or first, logs, force), as_json, "ingest")


@app.command("import-logs")
def import_logs_cmd(
    source: Annotated[str, typer.Option(help="The public data file (TSV or JSON).")],
    kind: Annotated[str, typer.Option("--format", help="tianchi | cg4ctr-json")] = "tianchi",
    images: Annotated[str | None, typer.Option(help="tianchi: the image folder.")] = None,
    start_date: Annotated[
        str, typer.Option(help="tianchi: the date of the smallest day number in ds.")
    ] = "2020-01-01",
    date: Annotated[str | None, typer.Option("--date", help="cg4ctr-json: its date.")] = None,
    out: Annotated[str | None, typer.Option(help="Log root (default data/raw/logs).")] = None,
    force: Annotated[bool, typer.Option(help="Replace existing items/creatives.")] = False,
    workspace: WorkspaceOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Convert a public click-log data set into raw log partitions for `cg4ctr ingest`."""
    from cg4ctr_tasks import adapters

    ws = _open(workspace)
    if kind == "tianchi":
        if images is None:
            raise UserError("--format tianchi needs --images FOLDER")
        figures = adapters.import_tianchi(ws, source, images, start_date, out, force)
    elif kind == "cg4ctr-json":
        if date is None:
            raise UserError("--format cg4ctr-json needs --date YYYY-MM-DD")
        figures = adapters.import_cg4ctr_json(ws, source, date, out)
    else:
        raise UserError(f"unknown --format {kind!r} (tianchi | cg4ctr-json)")
    _emit(figures, as_json, f"imported {source}")


@app.command("demo")
def demo(
    workspace: WorkspaceOpt = Path("workspace"),
    seed: Annotated[int | None, typer.Option(help="World seed (default: params seed).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds (default: params rounds).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The main job: world, bootstrap, self-cycling rounds, Table 1 of true CTR, HTML report."""
    from cg4ctr_tasks.demo import run_demo

    workspace.mkdir(parents=True, exist_ok=True)
    ws = _open(workspace)
    figures = run_demo(
        ws,
        seed if seed is not None else ws.params.seed,
        rounds or len(ws.params.rounds),
        lambda line: typer.echo(line, err=True),
    )
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
        return
    table = Table(
        title=f"True CTR of the creatives shown (simulated world, seed {figures['seed']})"
    )
    for column in ("round", "shown", "true CTR", "uplift vs round 0"):
        table.add_column(column)
    for row in figures["table"]:
        table.add_row(
            str(row["round"]), row["shown"], f"{row['true_ctr']:.4%}", f"{row['uplift']:+.1%}"
        )
    console.print(table)
    console.print(f"report: {figures['report']}")


RoundOpt = Annotated[int, typer.Option("--round", help="Round id (0 = bootstrap).", min=0, max=999)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo work whose output exists.")]


@app.command("select")
def select_cmd(
    round_id: RoundOpt,
    workspace: WorkspaceOpt = Path("."),
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Top-k candidates per (item, user group) by reward score -> G, the rest -> B."""
    from cg4ctr_tasks.select import select_round

    _emit(select_round(_open(workspace), round_id, force).as_dict(), as_json, "partition")


@app.command("prompts")
def prompts_cmd(
    round_id: RoundOpt,
    workspace: WorkspaceOpt = Path("."),
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """One prompt per (item, user group): top-p tokens by the prompt model, with exploration."""
    from cg4ctr_tasks.prompts.select import select_prompts

    _emit(select_prompts(_open(workspace), round_id, force).as_dict(), as_json, "prompts")


@app.command("train-prompt")
def train_prompt_cmd(
    round_id: Annotated[
        int | None, typer.Option("--round", help="Even round to train on (Eq 8).", min=2, max=999)
    ] = None,
    bootstrap: Annotated[
        bool, typer.Option("--bootstrap", help="Initial model from the CTR tables + captions.")
    ] = False,
    workspace: WorkspaceOpt = Path("."),
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the prompt model: --bootstrap from click logs, or --round N (even) on G/B."""
    from cg4ctr_tasks.prompts.train import train_prompt

    if bootstrap == (round_id is not None):
        raise UserError("train-prompt needs exactly one of --bootstrap and --round N")
    _emit(train_prompt(_open(workspace), round_id, force).as_dict(), as_json, "prompt model")


@app.command("round-for")
def round_for(
    date: Annotated[str, typer.Option(help="Logical date YYYY-MM-DD (e.g. Airflow's ds).")],
    workspace: WorkspaceOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """The round of a logical date from the round ledger (a new, later date gets the next id)."""
    from dataclasses import asdict

    from cg4ctr_tasks.rounds import round_for_date

    _emit(asdict(round_for_date(_open(workspace), date)), as_json, "round")


@app.command("version")
def version_cmd(
    round_id: RoundOpt,
    workspace: WorkspaceOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Record the round with DVC (commit + push to the remote) and tag it round-NNN in git."""
    from cg4ctr_tasks.versioning import version_round

    _emit(version_round(_open(workspace), round_id).as_dict(), as_json, "version")


@app.command("restore")
def restore_cmd(
    round_id: RoundOpt,
    workspace: WorkspaceOpt = Path("."),
) -> None:
    """Check out round-NNN's data and checkpoints (git checkout + dvc checkout)."""
    from cg4ctr_tasks.versioning import restore_round

    commit = restore_round(_open(workspace), round_id)
    typer.echo(f"restored round {round_id} at {commit}")


@sim_app.command("online")
def sim_online(
    round_id: RoundOpt,
    workspace: WorkspaceOpt = Path("."),
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Display the round's kept creatives, simulate a day of clicks into raw logs, measure."""
    from cg4ctr_tasks.rounds import round_info
    from cg4ctr_tasks.sim.online import online_round

    ws = _open(workspace)
    _emit(online_round(ws, round_info(ws, round_id), force), as_json, "online day")


@sim_app.command("baseline")
def sim_baseline(workspace: WorkspaceOpt = Path("."), as_json: JsonOpt = False) -> None:
    """True CTR of the initial creatives: round 0 of the uplift table."""
    from cg4ctr_tasks.sim.online import baseline_metrics

    _emit(baseline_metrics(_open(workspace)), as_json, "round 0")


@app.command("round")
def round_cmd(
    round_id: RoundOpt,
    workspace: WorkspaceOpt = Path("."),
    no_version: Annotated[
        bool, typer.Option("--no-version", help="Skip the DVC/git step (inside `dvc repro`).")
    ] = False,
) -> None:
    """Run one round's stages in order (round 0: the bootstrap); resumes where it stopped."""
    from cg4ctr_tasks.cycle import run_round

    run_round(_open(workspace), round_id, lambda line: typer.echo(line, err=True), not no_version)
    typer.echo(f"round {round_id} finished")


@app.command("cycle")
def cycle_cmd(
    rounds: Annotated[
        int | None, typer.Option(help="Rounds to run (default: params rounds).")
    ] = None,
    workspace: WorkspaceOpt = Path("."),
) -> None:
    """Bootstrap, then run self-cycling rounds end to end; re-run to resume after a crash."""
    from cg4ctr_tasks.cycle import run_cycle

    ws = _open(workspace)
    done = run_cycle(ws, rounds or len(ws.params.rounds), lambda line: typer.echo(line, err=True))
    typer.echo(f"rounds finished: {done}")


@app.command("train-reward")
def train_reward_cmd(
    round_id: Annotated[
        int | None,
        typer.Option("--round", help="Refresh for this round: logs before its date.", min=1),
    ] = None,
    workspace: WorkspaceOpt = Path("."),
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the reward model (Eq 14-17) on the CTR tables; epochs chosen on validation."""
    from cg4ctr_tasks.reward.train import train_reward
    from cg4ctr_tasks.rounds import logs_before

    ws = _open(workspace)
    before = None if round_id is None else logs_before(ws, round_id)
    _emit(train_reward(ws, force, before=before), as_json, "reward model")


@app.command("eval-reward")
def eval_reward_cmd(workspace: WorkspaceOpt = Path("."), as_json: JsonOpt = False) -> None:
    """Uplift top-1..5 and MSE (Eq 18-21) of the reward model on the held-out items."""
    from cg4ctr_tasks.reward.evaluate import eval_reward

    _emit(eval_reward(_open(workspace)), as_json, "reward model, test split")


@app.command("score")
def score_cmd(
    round_id: RoundOpt,
    workspace: WorkspaceOpt = Path("."),
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score a round's candidates with the reward model -> rounds/round-NNN/scores.parquet."""
    from cg4ctr_tasks.reward.score import score_round

    _emit(score_round(_open(workspace), round_id, force), as_json, "scores")


@app.command("report")
def report_cmd(workspace: WorkspaceOpt = Path("."), as_json: JsonOpt = False) -> None:
    """Write the self-contained HTML report (image grids, CTR per round, params)."""
    from cg4ctr_tasks.report import write_report

    _emit(write_report(_open(workspace)).as_dict(), as_json, "report")


ShardOpt = Annotated[
    str | None, typer.Option("--shard", help="i/n: this worker's share of the parts (0-based).")
]


@app.command("saliency")
def saliency_cmd(
    round_id: RoundOpt,
    workspace: WorkspaceOpt = Path("."),
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Product masks + masked products per item -> rounds/round-NNN/saliency/."""
    from cg4ctr_tasks.saliency import run_saliency
    from cg4ctr_tasks.shards import Shard

    summary = run_saliency(_open(workspace), round_id, Shard.parse(shard), force)
    _emit(summary.as_dict(), as_json, "saliency")


@app.command("caption")
def caption_cmd(
    round_id: Annotated[
        int | None, typer.Option("--round", help="Caption the round's candidates.", min=0, max=999)
    ] = None,
    creatives: Annotated[
        bool, typer.Option("--creatives", help="Caption data/creatives.parquet (bootstrap).")
    ] = False,
    workspace: WorkspaceOpt = Path("."),
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """CLIP-interrogator captions (vocab tokens) -> captions.parquet."""
    from cg4ctr_tasks.caption import caption_creatives, caption_round
    from cg4ctr_tasks.shards import Shard

    if creatives == (round_id is not None):
        raise UserError("caption needs exactly one of --creatives and --round N")
    ws = _open(workspace)
    if round_id is None:
        summary = caption_creatives(ws, Shard.parse(shard), force)
    else:
        summary = caption_round(ws, round_id, Shard.parse(shard), force)
    _emit(summary.as_dict(), as_json, "captions")


@sim_app.command("train-clip")
def sim_train_clip(
    workspace: WorkspaceOpt = Path("."),
    seed: Annotated[int | None, typer.Option(help="Training seed (default: params seed).")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (default: caption.train.steps).", min=1)
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default: the packaged asset assets/sim-clip)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the world's small CLIP on rendered backgrounds (the captioner; sim text encoder)."""
    import shlex

    from cg4ctr_tasks.assets import asset_path
    from cg4ctr_tasks.sim.train_clip import ASSET_NAME, train_clip

    ws = _open(workspace)
    command = shlex.join(["cg4ctr", *sys.argv[1:]])
    target = out if out is not None else asset_path(ASSET_NAME)
    chosen_seed = seed if seed is not None else ws.params.seed
    summary = train_clip(ws.params, target, chosen_seed, command, steps)
    _emit(summary.as_dict(), as_json, f"sim CLIP in {target}")


@sim_app.command("train-generator")
def sim_train_generator(
    workspace: WorkspaceOpt = Path("."),
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default: the packaged asset assets/sim-inpaint)."),
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the world's small SD-style inpainting model on rendered backgrounds."""
    import shlex

    from cg4ctr_tasks.assets import asset_path
    from cg4ctr_tasks.sim.train_generator import ASSET_NAME, train_generator

    ws = _open(workspace)
    target = out if out is not None else asset_path(ASSET_NAME)
    command = shlex.join(["cg4ctr", *sys.argv[1:]])
    summary = train_generator(ws.params, target, command, force)
    _emit(summary.as_dict(), as_json, f"sim inpainting model in {target}")


@app.command("generate")
def generate_cmd(
    round_id: RoundOpt,
    workspace: WorkspaceOpt = Path("."),
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Inpaint q candidates per item and user group -> rounds/round-NNN/candidates.parquet."""
    from cg4ctr_tasks.generate import generate_round
    from cg4ctr_tasks.shards import Shard

    summary = generate_round(_open(workspace), round_id, Shard.parse(shard), force)
    _emit(summary.as_dict(), as_json, "generate")


@sim_app.command("label-availability")
def sim_label_availability(
    workspace: WorkspaceOpt = Path("."),
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate and label (from ground truth) the inspector's training set -> data/inspector/."""
    from cg4ctr_tasks.sim.availability import label_availability

    _emit(label_availability(_open(workspace), force).as_dict(), as_json, "labelled set")


@app.command("train-inspector")
def train_inspector_cmd(
    workspace: WorkspaceOpt = Path("."),
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the availability inspector on data/inspector/labels.parquet -> models/inspector/."""
    from cg4ctr_tasks.inspector import train_inspector

    _emit(train_inspector(_open(workspace), force).as_dict(), as_json, "inspector")


@app.command("inspect")
def inspect_cmd(
    round_id: RoundOpt,
    workspace: WorkspaceOpt = Path("."),
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Label candidates; regenerate rejected ones with new seeds -> inspection.parquet."""
    from cg4ctr_tasks.inspector import inspect_round
    from cg4ctr_tasks.shards import Shard

    summary = inspect_round(_open(workspace), round_id, Shard.parse(shard), force)
    _emit(summary.as_dict(), as_json, "inspect")


@app.command("train-lora")
def train_lora_cmd(
    round_id: RoundOpt,
    workspace: WorkspaceOpt = Path("."),
    method: Annotated[
        str | None,
        typer.Option(help="sft (top-k, Eq 3/4) | preference (Diffusion-DPO); default: params."),
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Odd rounds: LoRA on the round's kept candidates (Eq 3/4) -> models/lora/round-NNN/."""
    from cg4ctr_tasks.train_lora import train_lora

    summary = train_lora(_open(workspace), round_id, force, method)
    _emit(summary.as_dict(), as_json, "train-lora")


def main() -> None:
    try:
        app()
    except UserError as exc:
        typer.echo(f"cg4ctr: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("cg4ctr: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
