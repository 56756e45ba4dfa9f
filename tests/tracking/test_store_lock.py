"""The store lock between processes, on a sqlite MLflow store."""

from __future__ import annotations

import multiprocessing
import warnings

import mlflow
import pytest

from defectvlm.errors import StepFailure
from defectvlm.tracking import store_lock as store_lock_module
from defectvlm.tracking.store_lock import store_lock

LOCK = "defectvlm.lock.test"
WAIT_S = 60


def _slow_holder(uri: str, took, let_go, warned) -> None:
    """Takes the lock, keeps it until told to let go (past its break-after time), then releases it."""
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with store_lock(client, LOCK, "slow work"):
            took.set()
            let_go.wait(WAIT_S)
    warned.put([str(w.message) for w in caught])


def test_a_slow_holders_release_leaves_the_next_holders_lock_alone(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_registered_models()  # the schema exists before two processes reach for it
    spawn = multiprocessing.get_context("spawn")
    took, let_go, warned = spawn.Event(), spawn.Event(), spawn.Queue()
    slow = spawn.Process(target=_slow_holder, args=(uri, took, let_go, warned))
    slow.start()
    try:
        assert took.wait(WAIT_S), "the slow holder never took the lock"
        monkeypatch.setattr(store_lock_module, "LOCK_STALE_S", 1.0)
        with store_lock(client, LOCK, "next work"):  # breaks the slow holder's lock once it is stale
            let_go.set()
            slow.join(WAIT_S)
            assert slow.exitcode == 0
            assert client.get_registered_model(LOCK).description.startswith("next work by ")
        assert client.search_registered_models(f"name = '{LOCK}'") == []
        assert any("was no longer this process's" in message for message in warned.get(timeout=WAIT_S))
    finally:
        let_go.set()
        slow.join(WAIT_S)


def test_waiting_for_a_lock_that_keeps_vanishing_ends_at_the_deadline(monkeypatch):
    """A server that answers every create with RESOURCE_DOES_NOT_EXIST (its lookup after a lost race
    found the lock released) must not keep the client spinning past LOCK_WAIT_S."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    class VanishingLockClient:
        creates = 0

        def create_registered_model(self, name, tags=None, description=""):
            self.creates += 1
            assert self.creates < 100, "retried without waiting"
            raise MlflowException("gone", error_code=RESOURCE_DOES_NOT_EXIST)

        def get_registered_model(self, name):
            raise MlflowException("gone", error_code=RESOURCE_DOES_NOT_EXIST)

    monkeypatch.setattr(store_lock_module, "LOCK_WAIT_S", 0.5)
    with pytest.raises(StepFailure, match="locked by another process"), store_lock(VanishingLockClient(), LOCK, "work"):
        pass
