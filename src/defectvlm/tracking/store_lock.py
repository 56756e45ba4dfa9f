"""Coordination through the tracking store alone. Clients of a shared MLflow server reach it only
through its REST API, whose one atomic primitive is "create a registered model with a unique
name" (a unique key in the server's database): a lock is a registered model that exists while
its holder works. Its other get-or-create calls (dataset inputs, aliases) are a read then an
insert, so two clients at once can collide on the insert: the loser tries again and finds the
row the winner wrote."""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from defectvlm.errors import StepFailure

LOCK_WAIT_S = 300.0  # how long a client waits for another holder of the same lock
LOCK_STALE_S = 600.0  # a lock older than this was left by a crashed process: it is broken
INSERT_ATTEMPTS = 5  # tries of a call that may lose an insert race
T = TypeVar("T")


@contextlib.contextmanager
def store_lock(client, lock: str, purpose: str) -> Iterator[None]:
    """Hold the lock named `lock` (a registered model only one process can create). Waits up to
    LOCK_WAIT_S; breaks a lock older than LOCK_STALE_S (its holder crashed)."""
    from mlflow.exceptions import MlflowException

    holder = f"{os.environ.get('DEFECTVLM_USER') or getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            client.create_registered_model(lock, description=f"{purpose} by {holder}")
            break
        except MlflowException as exc:
            # the server answers a lost insert race by looking the lock up: when its holder released
            # it in between, that lookup fails with RESOURCE_DOES_NOT_EXIST: simply try again
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            created = client.get_registered_model(lock).creation_timestamp / 1000
        except MlflowException:
            continue  # released meanwhile
        if time.time() - created > LOCK_STALE_S:
            _drop_lock(client, lock)
        elif time.monotonic() > deadline:
            raise StepFailure(
                f"{purpose}: locked for {time.time() - created:.0f} s by another process "
                f"(registered model {lock}): try again, or delete {lock} if its process is gone"
            )
        time.sleep(random.uniform(0.1, 0.5))
    try:
        yield
    finally:
        _drop_lock(client, lock)


def _drop_lock(client, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def retry_lost_insert(call: Callable[..., T], *args, **kwargs) -> T:
    """`call(*args, **kwargs)`, again when the store answers with a unique-key error (it lost an
    insert race: the row now exists, so the next attempt reads it). Any other error is raised at once."""
    from mlflow.exceptions import MlflowException

    for attempt in range(INSERT_ATTEMPTS - 1):
        try:
            return call(*args, **kwargs)
        except MlflowException as exc:
            text = str(exc).lower()
            if not ("already exists" in text or "unique" in text or "duplicate key" in text):
                raise
            time.sleep(0.2 * (attempt + 1))
    return call(*args, **kwargs)
