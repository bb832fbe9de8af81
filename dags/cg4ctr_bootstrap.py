"""cg4ctr_bootstrap: manual. Round 0 from the click history, before any generation.

ingest all pending log partitions -> caption the logged creatives -> train the reward model ->
train the initial prompt model -> (simulated world) label a set of generations for the
availability inspector -> train the inspector (both skipped when `inspector.enabled` is false)
-> (simulated world) measure the round-0 baseline -> version the result as round-000. Run it
once per workspace; cg4ctr_nightly needs its models.
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
    dag_id="cg4ctr_bootstrap",
    schedule=None,
    **dag_settings(P, __doc__),
)
def cg4ctr_bootstrap() -> None:
    @task.bash(outlets=[ROUND_ASSETS["logs"]])
    def ingest() -> str:
        return cli("ingest", "--pending")

    @task.bash
    def caption_creatives() -> str:
        return cli("caption", "--creatives")

    @task.bash(outlets=[ROUND_ASSETS["reward"]])
    def train_reward() -> str:
        return cli("train-reward")

    @task.bash(outlets=[ROUND_ASSETS["prompt"]])
    def train_prompt() -> str:
        return cli("train-prompt", "--bootstrap")

    @task.bash(pool=GPU_POOL, queue=GPU_QUEUE)
    def label_availability() -> str:
        """The inspector's labelled set: the world's labeller (annotators in production)."""
        if not P.inspector.enabled:
            return "echo 'inspector disabled: skipped'"
        return (
            f'if [ -f "${{CG4CTR_WORKSPACE:-.}}/sim/oracle.json" ]; then '
            f"{CLI} sim label-availability; else echo 'no simulated world: skipped'; fi"
        )

    @task.bash
    def train_inspector() -> str:
        if not P.inspector.enabled:
            return "echo 'inspector disabled: skipped'"
        return cli("train-inspector")

    @task.bash
    def baseline() -> str:
        return (
            f'if [ -f "${{CG4CTR_WORKSPACE:-.}}/sim/oracle.json" ]; then '
            f"{CLI} sim baseline; else echo 'no simulated world: skipped'; fi"
        )

    @task.bash(pool=DVC_POOL, outlets=[ROUND_ASSETS["round"]])
    def version() -> str:
        return cli("version", "--round", "0")

    labelled = label_availability()
    ingest() >> caption_creatives() >> train_reward() >> train_prompt() >> labelled
    labelled >> train_inspector() >> baseline() >> version()


cg4ctr_bootstrap()
