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
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from defectvlm.errors import StepFailure

LOCK_WAIT_S = 300.0  # how long a client waits for another holder of the same lock
LOCK_STALE_S = 600.0  # a lock older than this was left by a crashed process: it is broken
INSERT_ATTEMPTS = 5  # tries of a call that may lose an insert race
OWNER_TAG = "defectvlm.lock.owner"  # a token only the holder knows: a release deletes its own lock, never a successor's
T = TypeVar("T")


@contextlib.contextmanager
def store_lock(client, lock: str, purpose: str) -> Iterator[None]:
    """Hold the lock named `lock` (a registered model only one process can create). Waits up to
    LOCK_WAIT_S; breaks a lock older than LOCK_STALE_S (its holder crashed). A holder that outlives
    LOCK_STALE_S may have lost its lock to another process: its release leaves that one's lock alone
    and warns."""
    holder = f"{os.environ.get('DEFECTVLM_USER') or getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + LOCK_WAIT_S
    while not _create_lock(client, lock, f"{purpose} by {holder}", token):
        held = _held_lock(client, lock)
        if held is not None and time.time() - held.created_s > LOCK_STALE_S:
            _drop_lock(client, lock, held.owner)
        if time.monotonic() > deadline:
            age = "" if held is None else f" for {time.time() - held.created_s:.0f} s"
            raise StepFailure(
                f"{purpose}: locked{age} by another process "
                f"(registered model {lock}): try again, or delete {lock} if its process is gone"
            )
        time.sleep(random.uniform(0.1, 0.5))
    try:
        yield
    finally:
        if not _drop_lock(client, lock, token):
            warnings.warn(
                f"{purpose}: the lock {lock} was no longer this process's when it finished (held longer than "
                f"{LOCK_STALE_S:.0f} s, another process broke it, or it was deleted by hand): "
                "other work under the same lock may have overlapped this one",
                RuntimeWarning,
                stacklevel=3,
            )


@dataclass(frozen=True)
class _HeldLock:
    created_s: float
    owner: str | None  # None: a lock written before owners were recorded


def _create_lock(client, lock: str, description: str, token: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(lock, tags={OWNER_TAG: token}, description=description)
        return True
    except MlflowException as exc:
        # the server answers a lost insert race by looking the lock up: when its holder released
        # it in between, that lookup fails with RESOURCE_DOES_NOT_EXIST: simply try again
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            raise
        return False


def _held_lock(client, lock: str) -> _HeldLock | None:
    """The lock as the store holds it now, None when it is not held."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    return _HeldLock(created_s=model.creation_timestamp / 1000, owner=model.tags.get(OWNER_TAG))


def _drop_lock(client, lock: str, owner: str | None) -> bool:
    """Delete `lock` if `owner` holds it; whether it did. The store has no conditional delete, so a
    successor could still slip in between the check and the delete: a window of one round trip,
    against the whole time a slow holder overruns without the check."""
    from mlflow.exceptions import MlflowException

    held = _held_lock(client, lock)
    if held is None or held.owner != owner:
        return False
    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return True


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
