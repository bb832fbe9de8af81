"""cg4ctr_nightly: one self-cycling round per run (DESIGN.md section 5).

ingest -> reward refresh (when due) -> saliency (mapped over item shards) -> prompts ->
generate (mapped, `gpu` pool and queue) -> inspect (availability inspector + recurrent
generation, mapped; a no-op when `inspector.enabled` is false) -> caption -> score -> select ->
train (odd round: LoRA, even: prompt model) -> online day (simulated world only) -> version
(DVC, `dvc` pool) -> report.
The round comes from the ledger for the run's logical date, so clearing a run re-does its round
and a backfill runs consecutive rounds in date order; every stage is idempotent. Rounds build on
each other, so a run first waits while the run of an earlier date is unfinished: a backfill
starts several runs at once (its own max-active-runs, not the DAG's).
"""

from __future__ import annotations

from airflow.sdk import dag, task
from cg4ctr_dag_support import (
    CLI,
    DVC_POOL,
    GPU_POOL,
    GPU_QUEUE,
    ROUND_ASSETS,
    cli,
    dag_settings,
    params,
)

P = params()


@dag(
    dag_id="cg4ctr_nightly",
    schedule=P.airflow.schedule,
    **dag_settings(P, __doc__),
)
def cg4ctr_nightly() -> None:
    @task.sensor(
        mode="reschedule",
        poke_interval=P.airflow.previous_run_poke_s,
        timeout=P.airflow.previous_run_timeout_s,
    )
    def previous_run_finished() -> bool:
        """Wait (freeing the worker slot) while the run of the latest earlier date is queued or
        running. A failed one does not block: the nightly goes on, and clearing it re-does its
        own round."""
        from airflow.sdk import get_current_context

        previous = get_current_context()["ti"].get_previous_dagrun()
        return previous is None or previous.state not in ("queued", "running")

    @task(multiple_outputs=True)
    def round_info(ds: str | None = None) -> dict[str, object]:
        """Map the logical date to its round (new date: next round; known date: same round)."""
        from dataclasses import asdict

        from cg4ctr_dag_support import workspace_dir

        from cg4ctr_tasks.rounds import round_for_date
        from cg4ctr_tasks.workspace import Workspace

        assert ds is not None
        info = round_for_date(Workspace.open(workspace_dir()), ds)
        return asdict(info)

    @task.bash(outlets=[ROUND_ASSETS["logs"]])
    def ingest() -> str:
        return cli("ingest", "--pending")

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def reward_due(round_id: int) -> bool:
        every = P.cycle.reward_refresh_every
        return P.cycle.train and bool(every) and int(round_id) % every == 0

    @task.bash(outlets=[ROUND_ASSETS["reward"]])
    def train_reward(round_id: int) -> str:
        return cli("train-reward", "--round", str(round_id))

    @task
    def shards(shard_size: int) -> list[str]:
        from cg4ctr_dag_support import workspace_dir

        from cg4ctr_tasks.cycle import shard_specs
        from cg4ctr_tasks.workspace import Workspace

        return shard_specs(Workspace.open(workspace_dir()), shard_size)

    @task.bash(trigger_rule="none_failed")
    def saliency(shard: str, round_id: int) -> str:
        return cli("saliency", "--round", str(round_id), "--shard", shard)

    @task.bash
    def prompts(round_id: int) -> str:
        return cli("prompts", "--round", str(round_id))

    @task.bash(pool=GPU_POOL, queue=GPU_QUEUE)
    def generate(shard: str, round_id: int) -> str:
        return cli("generate", "--round", str(round_id), "--shard", shard)

    @task.bash(outlets=[ROUND_ASSETS["candidates"]])
    def merge_candidates(round_id: int) -> str:
        """The unsharded call finds every shard's parts done and writes candidates.parquet."""
        return cli("generate", "--round", str(round_id))

    @task.bash(pool=GPU_POOL, queue=GPU_QUEUE)
    def inspect(shard: str, round_id: int) -> str:
        return cli("inspect", "--round", str(round_id), "--shard", shard)

    @task.bash(outlets=[ROUND_ASSETS["candidates"]])
    def merge_inspection(round_id: int) -> str:
        """The unsharded call writes inspection.parquet and the final candidates.parquet."""
        return cli("inspect", "--round", str(round_id))

    @task.bash
    def caption(round_id: int) -> str:
        return cli("caption", "--round", str(round_id))

    @task.bash
    def score(round_id: int) -> str:
        return cli("score", "--round", str(round_id))

    @task.bash(outlets=[ROUND_ASSETS["partition"]])
    def select(round_id: int) -> str:
        return cli("select", "--round", str(round_id), "--force")

    @task.branch
    def choose_training(mode: str) -> str:
        """Odd rounds train the LoRA (Eq 3/4), even rounds the prompt model (Eq 8)."""
        if not P.cycle.train:
            return "online"
        return "train_lora" if mode == "lora" else "train_prompt"

    @task.bash(pool=GPU_POOL, queue=GPU_QUEUE, outlets=[ROUND_ASSETS["lora"]])
    def train_lora(round_id: int) -> str:
        return cli("train-lora", "--round", str(round_id))

    @task.bash(outlets=[ROUND_ASSETS["prompt"]])
    def train_prompt(round_id: int) -> str:
        return cli("train-prompt", "--round", str(round_id))

    @task.bash(trigger_rule="none_failed_min_one_success")
    def online(round_id: int) -> str:
        """The simulated world's online day; a no-op in a workspace without one."""
        return (
            f'if [ -f "${{CG4CTR_WORKSPACE:-.}}/sim/oracle.json" ]; then '
            f"{CLI} sim online --round {round_id}; else echo 'no simulated world: skipped'; fi"
        )

    @task.bash(pool=DVC_POOL, outlets=[ROUND_ASSETS["round"]])
    def version(round_id: int) -> str:
        return cli("version", "--round", str(round_id))

    @task.bash(trigger_rule="none_failed")
    def report() -> str:
        return cli("report")

    info = round_info()
    previous_run_finished() >> info
    rid = info["id"]
    ingested = ingest()
    refreshed = train_reward(rid)
    salient = saliency.partial(round_id=rid).expand(
        shard=shards.override(task_id="saliency_shards")(P.saliency.shard_size)
    )
    generated = generate.partial(round_id=rid).expand(
        shard=shards.override(task_id="generate_shards")(P.generate.shard_size)
    )
    inspected = inspect.partial(round_id=rid).expand(
        shard=shards.override(task_id="inspect_shards")(P.inspector.shard_size)
    )
    branch = choose_training(info["mode"])
    shown = online(rid)
    info >> ingested >> reward_due(rid) >> refreshed >> salient >> prompts(rid) >> generated
    captioned = caption(rid)
    generated >> merge_candidates(rid) >> inspected >> merge_inspection(rid) >> captioned
    captioned >> score(rid) >> select(rid) >> branch
    branch >> [train_lora(rid), train_prompt(rid)] >> shown
    branch >> shown
    shown >> version(rid) >> report()


cg4ctr_nightly()
