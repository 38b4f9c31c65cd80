"""Environments: the recipe (packages, networking) for every session container that uses them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

from .clock import now
from .errors import ConflictError, NotFoundError
from .idempotency import IdempotencyKeys, create_once
from .models import EnvironmentCreateParams, EnvironmentUpdateParams
from .store import Database, Json, Order, Page, dumps, paginate_by_id


def _decode(row: sqlite3.Row) -> Json:
    body: Json = json.loads(row["body"])
    body["archived_at"] = row["archived_at"]
    return body


def _not_found(environment_id: str) -> NotFoundError:
    msg = (
        f"environment {environment_id} not found; call list_environments to see existing ones "
        "or create_environment to make one"
    )
    return NotFoundError(msg)


def _name_taken(name: str) -> ConflictError:
    msg = f"conflict: an environment named {name!r} already exists; choose another name"
    return ConflictError(msg)


class EnvironmentService:
    """Create, read, update, list, archive and delete environments.

    `on_change` is told about every created or reconfigured environment (the runtime starts
    building its image then).
    """

    def __init__(
        self,
        db: Database,
        on_change: Callable[[Json], None] | None = None,
        keys: IdempotencyKeys | None = None,
    ) -> None:
        self._db = db
        self._on_change = on_change
        self._keys = keys

    def _changed(self, environment: Json) -> None:
        if self._on_change is not None:
            self._on_change(environment)

    async def create(
        self, params: EnvironmentCreateParams, *, idempotency_key: str | None = None
    ) -> Json:
        """Create an environment (once per `idempotency_key`, see idempotency.py).

        Raises:
            ConflictError: the name is taken.
        """
        return await create_once(
            self._keys,
            "environments",
            idempotency_key,
            params.model_dump(mode="json"),
            prefix="env",
            create=lambda environment_id: self._create(environment_id, params),
            fetch=self.retrieve,
        )

    async def _create(self, environment_id: str, params: EnvironmentCreateParams) -> Json:
        stamp = now()
        environment: Json = {
            "id": environment_id,
            "type": "environment",
            "name": params.name,
            "description": params.description,
            "config": params.config.model_dump(exclude_none=True),
            "metadata": dict(params.metadata),
            "scope": "account",
            "created_at": stamp,
            "updated_at": stamp,
            "archived_at": None,
        }

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO environments (id, name, body) VALUES (?, ?, ?)",
                    (environment["id"], params.name, dumps(environment)),
                )
            except sqlite3.IntegrityError as exc:
                raise _name_taken(params.name) from exc

        await self._db.write(insert)
        self._changed(environment)
        return environment

    async def retrieve(self, environment_id: str) -> Json:
        row = await self._db.read(
            lambda c: c.execute(
                "SELECT body, archived_at FROM environments WHERE id = ?", (environment_id,)
            ).fetchone()
        )
        if row is None:
            raise _not_found(environment_id)
        return _decode(row)

    async def by_name(self, name: str) -> Json | None:
        row = await self._db.read(
            lambda c: c.execute(
                "SELECT body, archived_at FROM environments WHERE name = ?", (name,)
            ).fetchone()
        )
        return _decode(row) if row else None

    async def update(self, environment_id: str, params: EnvironmentUpdateParams) -> Json:
        """Apply `params`; the change reaches containers created afterwards.

        Raises:
            NotFoundError: no such environment.
            ConflictError: it is archived, or the new name is taken.
        """

        def apply(conn: sqlite3.Connection) -> Json:
            row = conn.execute(
                "SELECT body, archived_at FROM environments WHERE id = ?", (environment_id,)
            ).fetchone()
            if row is None:
                raise _not_found(environment_id)
            current = _decode(row)
            if current["archived_at"] is not None:
                msg = f"environment {environment_id} is archived and read-only"
                raise ConflictError(msg)
            merged = dict(current)
            fields = params.model_fields_set
            if "name" in fields and params.name is not None:
                merged["name"] = params.name
            if "description" in fields:
                merged["description"] = params.description
            if "config" in fields and params.config is not None:
                merged["config"] = params.config.model_dump(exclude_none=True)
            if params.metadata:
                metadata = dict(current["metadata"])
                for key, value in params.metadata.items():
                    if value is None:
                        metadata.pop(key, None)
                    else:
                        metadata[key] = value
                merged["metadata"] = metadata
            if merged == current:
                return current
            merged["updated_at"] = now()
            try:
                conn.execute(
                    "UPDATE environments SET name = ?, body = ? WHERE id = ?",
                    (merged["name"], dumps(merged), environment_id),
                )
            except sqlite3.IntegrityError as exc:
                raise _name_taken(merged["name"]) from exc
            return merged

        updated = await self._db.write(apply)
        self._changed(updated)
        return updated

    async def list(
        self,
        *,
        limit: int = 20,
        page: str | None = None,
        include_archived: bool = False,
        order: Order = "desc",
    ) -> Page:
        sql = "SELECT id, body, archived_at FROM environments WHERE 1=1"
        if not include_archived:
            sql += " AND archived_at IS NULL"
        return await self._db.read(
            lambda c: paginate_by_id(
                c, sql, (), limit=limit, page=page, order=order, decode=_decode
            )
        )

    async def archive(self, environment_id: str) -> Json:
        stamp = now()

        def apply(conn: sqlite3.Connection) -> None:
            if not conn.execute(
                "UPDATE environments SET archived_at = COALESCE(archived_at, ?) WHERE id = ?",
                (stamp, environment_id),
            ).rowcount:
                raise _not_found(environment_id)

        await self._db.write(apply)
        return await self.retrieve(environment_id)

    async def delete(self, environment_id: str) -> Json:
        """Delete an environment no session references.

        Raises:
            NotFoundError: no such environment.
            ConflictError: sessions still reference it.
        """

        def apply(conn: sqlite3.Connection) -> None:
            if (
                conn.execute(
                    "SELECT 1 FROM environments WHERE id = ?", (environment_id,)
                ).fetchone()
                is None
            ):
                raise _not_found(environment_id)
            count = conn.execute(
                "SELECT COUNT(*) FROM sessions WHERE environment_id = ?", (environment_id,)
            ).fetchone()[0]
            if count:
                msg = (
                    f"conflict: environment {environment_id} is used by {count} session(s); "
                    "delete those sessions first (or archive the environment instead)"
                )
                raise ConflictError(msg)
            conn.execute("DELETE FROM environments WHERE id = ?", (environment_id,))

        await self._db.write(apply)
        return {"id": environment_id, "type": "environment_deleted"}
