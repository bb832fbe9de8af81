from __future__ import annotations

import pandas as pd
import pytest

from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.select import partition


def _scores() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "candidate_id": ["c3", "c1", "c2", "c4", "c5", "d1"],
            "item_id": ["i"] * 5 + ["j"],
            "user_group": ["g0"] * 4 + ["g1", "g0"],
            "score": [0.5, 0.9, 0.5, 0.1, 0.7, 0.2],
        }
    )


def test_top_k_per_item_and_group_with_id_tie_break() -> None:
    part = partition(_scores(), k=2)
    i_g0 = part[(part.item_id == "i") & (part.user_group == "g0")]
    assert list(i_g0.candidate_id) == ["c1", "c2", "c3", "c4"]  # c2 before c3: tie by id
    assert list(i_g0["rank"]) == [1, 2, 3, 4]
    assert list(i_g0.kept) == [True, True, False, False]
    # a list shorter than k keeps everything
    assert part.set_index("candidate_id").loc[["c5", "d1"], "kept"].all()


def test_partition_is_deterministic_under_row_order() -> None:
    shuffled = _scores().sample(frac=1.0, random_state=3)
    pd.testing.assert_frame_equal(partition(shuffled, 2), partition(_scores(), 2))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda f: f.drop(columns=["score"]), "lacks columns"),
        (lambda f: pd.concat([f, f.head(1)]), "twice"),
        (lambda f: f.assign(score=[None, 1, 1, 1, 1, 1]), "missing scores"),
    ],
)
def test_bad_scores_are_rejected(mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError, match=needle):
        partition(mutate(_scores()), 2)
