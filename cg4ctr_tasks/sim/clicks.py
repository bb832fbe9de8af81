"""The click simulator: the "online" side of the world.

Creatives are displayed per (item, user group) with epsilon-greedy exploration over the
platform's own click history (never the oracle), impressions are spread over devices and hours,
and clicks are Bernoulli draws from the oracle's true CTR. The output is click-log rows in the
production format, so the pipeline ingests simulated days exactly like real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cg4ctr_tasks.contracts import LOG_COLUMNS as RAW_LOG_COLUMNS
from cg4ctr_tasks.sim.oracle import Oracle

LOG_COLUMNS = list(RAW_LOG_COLUMNS)
PRIOR_IMPRESSIONS = 50.0  # pseudo-impressions at the mean CTR for the greedy estimate


@dataclass
class ClickHistory:
    """Clicks and impressions seen so far per (creative, group): the greedy arm's evidence."""

    clicks: dict[tuple[str, str], int] = field(default_factory=dict)
    impressions: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, logs: pd.DataFrame) -> None:
        keys = ["creative_id", "user_group"]
        sums = logs.groupby(keys)[["clicks", "impressions"]].sum().reset_index()
        for creative, group, clicks, impressions in sums.itertuples(index=False, name=None):
            key = (str(creative), str(group))
            self.clicks[key] = self.clicks.get(key, 0) + int(clicks)
            self.impressions[key] = self.impressions.get(key, 0) + int(impressions)

    def estimate(self, creative: str, group: str, prior_ctr: float) -> float:
        key = (creative, group)
        clicks = self.clicks.get(key, 0) + prior_ctr * PRIOR_IMPRESSIONS
        return clicks / (self.impressions.get(key, 0) + PRIOR_IMPRESSIONS)


def simulate_day(
    oracle: Oracle,
    displayed: pd.DataFrame,
    true_ctr: dict[tuple[str, str], float],
    date: str,
    impressions_per_day: int,
    epsilon: float,
    history: ClickHistory,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """One day of logs for the ``displayed`` creatives (columns item_id, creative_id).

    With a ``user_group`` column each group sees only its own rows (per-group creatives);
    without, every group sees every row. An optional ``prior`` column (the platform's own
    predicted score) orders cold-start creatives, which have no clicks to be greedy about.
    ``true_ctr`` maps (creative_id, group) to the oracle's CTR; only clicks are drawn from it.
    """
    devices = list(oracle.device_factors)
    device_share = np.full(len(devices), 1.0 / len(devices))
    cell_share = np.outer(device_share, np.asarray(oracle.hour_traffic)).ravel()
    cell_factor = np.outer(
        np.asarray([oracle.device_factors[d] for d in devices]), np.asarray(oracle.hour_factors)
    ).ravel()
    prior_ctr = float(1.0 / (1.0 + np.exp(-oracle.base_logit)))
    order = (
        ["item_id", "prior", "creative_id"] if "prior" in displayed else ["item_id", "creative_id"]
    )
    ascending = [True, False, True] if "prior" in displayed else [True, True]
    shown_frame = displayed.sort_values(order, ascending=ascending)
    rows: list[tuple[str, str, str, str, str, int, int, int]] = []
    for item_id, item_frame in shown_frame.groupby("item_id", sort=True):
        for group in sorted(oracle.groups):
            if "user_group" in item_frame:
                creatives = [
                    str(c) for c in item_frame.loc[item_frame["user_group"] == group, "creative_id"]
                ]
            else:
                creatives = [str(c) for c in item_frame["creative_id"]]
            if not creatives:
                continue
            estimates = np.array([history.estimate(c, group, prior_ctr) for c in creatives])
            share = np.full(len(creatives), epsilon / len(creatives))
            share[int(np.argmax(estimates))] += 1.0 - epsilon
            total = int(rng.poisson(impressions_per_day))
            for creative, shown in zip(creatives, rng.multinomial(total, share), strict=True):
                if shown == 0:
                    continue
                cells = rng.multinomial(int(shown), cell_share)
                p = np.clip(true_ctr[(creative, group)] * cell_factor, 0.0, 1.0)
                clicks = rng.binomial(cells, p)
                for cell in np.flatnonzero(cells):
                    rows.append(
                        (
                            date,
                            str(item_id),
                            creative,
                            group,
                            devices[cell // 24],
                            int(cell % 24),
                            int(cells[cell]),
                            int(clicks[cell]),
                        )
                    )
    logs = pd.DataFrame(rows, columns=LOG_COLUMNS)
    history.add(logs)
    return logs
