"""Dataset inputs of a run: two Tune trials starting together both insert the same dataset into MLflow's SQL
store and one fails on its unique key (seen in CI, sqlite); log_inputs retries that error, and only that."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from pipeline.tracking import log_inputs

RACE = "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest"


class Store:
    def __init__(self, errors: list[str]):
        self.errors, self.calls = list(errors), 0

    def log_inputs(self, run_id, datasets):
        self.calls += 1
        if self.errors:
            raise MlflowException(self.errors.pop(0))


def test_the_unique_key_race_is_retried_until_the_dataset_links():
    store = Store([RACE])
    log_inputs(store, "run", [])
    assert store.calls == 2


def test_other_errors_and_a_lasting_race_still_raise():
    with pytest.raises(MlflowException, match="permission"):
        log_inputs(Store(["permission denied"]), "run", [])
    lasting = Store([RACE] * 5)
    with pytest.raises(MlflowException, match="UNIQUE"):
        log_inputs(lasting, "run", [], attempts=3)
    assert lasting.calls == 3
