"""cg4ctr_reward: periodic reward-model retraining on all ingested logs, with its metrics.

Runs weekly by default (and whenever new CTR tables land, through the asset), so the reward
model keeps up with the creatives the loop has shown; the nightly DAG picks up the new
checkpoint at its next score stage.
"""

from __future__ import annotations

from airflow.sdk import dag, task
from cg4ctr_dag_support import ROUND_ASSETS, cli, dag_settings, params

P = params()


@dag(
    dag_id="cg4ctr_reward",
    schedule="@weekly",
    **dag_settings(P, __doc__),
)
def cg4ctr_reward() -> None:
    @task.bash(outlets=[ROUND_ASSETS["logs"]])
    def ingest() -> str:
        return cli("ingest", "--pending")

    @task.bash(outlets=[ROUND_ASSETS["reward"]])
    def train_reward() -> str:
        return cli("train-reward")

    @task.bash(do_xcom_push=True)
    def eval_reward() -> str:
        return cli("eval-reward", "--json")

    ingest() >> train_reward() >> eval_reward()


cg4ctr_reward()
