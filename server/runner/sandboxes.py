"""Session sandboxes: create (warm pool first), re-attach, egress sockets, files, cleanup."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import tarfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from sandbox.base import (
    OUTPUTS_DIR,
    UPLOADS_DIR,
    Limits,
    Sandbox,
    SandboxBackend,
    SandboxSpec,
)
from sandbox.egress import EgressManager, EgressPolicy, OverrideResolver
from sandbox.errors import SandboxError, SandboxNotFound
from sandbox.shell import ShellSandbox
from server.core.errors import RequestTooLargeError
from server.core.files import BlobStore, FileService
from server.core.instances import InstanceRegistry
from server.core.session_store import SessionStore
from server.settings import Settings

from .images import EnvironmentImages
from .pool import POOL_LABEL, POOL_PREFIX, WarmPool, spec_key

logger = logging.getLogger(__name__)

Json = dict[str, Any]
LABEL = "managed-agents-mcp"
SESSION_LABEL = "managed-agents-mcp.session"
HOME_LABEL = "managed-agents-mcp.home"
INSTANCE_LABEL = "managed-agents-mcp.instance"
EGRESS_LABEL = "managed-agents-mcp.egress"
"""The key of the sandbox's egress proxy socket (its name at creation; names change on hand-out)."""
BUILD_WAIT_S = 40.0
"""How long `start_session` waits for an environment image (under clients' 60 s limit)."""
REBUILD_WAIT_S = 1800.0
MAX_OUTPUT_FILE = 100 << 20
"""Output files larger than this are not collected."""
MAX_OUTPUT_FILES = 1000
"""At most this many new or changed output files are collected per turn."""
OUTPUT_STREAM_CHUNKS = 16
"""Archive chunks (one exec frame each, at most tens of KiB) in flight while collecting."""


def limits_for(config: Json, defaults: Limits) -> Limits:
    """Container limits from an environment's `config.limits` over the server defaults."""

    def mib(name: str, default: int) -> int:
        return int(config[name]) << 20 if config.get(name) else default

    return Limits(
        memory_bytes=mib("memory_mb", defaults.memory_bytes),
        cpus=float(config.get("cpus") or defaults.cpus),
        pids=int(config.get("pids") or defaults.pids),
        tmp_bytes=mib("tmp_mb", defaults.tmp_bytes),
        home_bytes=defaults.home_bytes,
        outputs_bytes=mib("outputs_mb", defaults.outputs_bytes),
        uploads_bytes=defaults.uploads_bytes,
        workspace_bytes=mib("workspace_mb", defaults.workspace_bytes),
    )


def egress_policy(environment: Json, agent: Json | None) -> EgressPolicy | None:
    """The environment's network policy; None when it allows nothing (no socket at all)."""
    networking = (environment.get("config") or {}).get("networking") or {"type": "unrestricted"}
    hosts = [
        host
        for server in (agent or {}).get("mcp_servers") or []
        if (host := urlsplit(str(server.get("url") or "")).hostname)
    ]
    if networking.get("type") == "limited" and not (
        networking.get("allowed_hosts")
        or networking.get("allow_package_managers")
        or (networking.get("allow_mcp_servers") and hosts)
    ):
        return None
    return EgressPolicy.from_networking(networking, mcp_server_hosts=hosts)


class SandboxManager:
    """This process's sandboxes of the sessions it runs, and its warm pool."""

    def __init__(
        self,
        store: SessionStore,
        instances: InstanceRegistry,
        backend: SandboxBackend,
        settings: Settings,
        files: FileService,
    ) -> None:
        self._store = store
        self._instances = instances
        self._backend = backend
        self._settings = settings
        self._files = files
        self.images = EnvironmentImages(backend, settings)
        self.egress = EgressManager(
            settings.home / "egress",
            resolver=OverrideResolver(settings.egress_hosts) if settings.egress_hosts else None,
        )
        self._pool = WarmPool(backend, settings.warm_pool, on_discard=self._close_egress)
        self.home_label = hashlib.sha256(str(settings.home.resolve()).encode()).hexdigest()[:16]
        self._sandboxes: dict[str, Sandbox] = {}
        self._egress_keys: dict[str, str] = {}
        """Sandbox id → egress key, for sandboxes with an open egress socket."""
        self._locks: dict[str, anyio.Lock] = {}
        self._pool_keys: dict[str, str] = {}
        """Pool key → environment id, to retire pools of reconfigured environments."""
        self._output_index: dict[str, dict[str, str]] = {}
        """Session id → output path → "size mtime" seen at the last collection."""

    def bind(self, task_group: anyio.abc.TaskGroup) -> None:
        """Background work (image builds, pool refills) runs in the supervisor's task group."""
        self.images.bind(task_group)
        self._pool.bind(task_group)

    async def stop_all(self) -> None:
        """Shutdown: empty the pool and stop this process's session containers.

        Callers shield and bound it; the egress manager (entered by the caller) closes after.
        """
        await self._pool.drain()
        sandboxes, self._sandboxes = self._sandboxes, {}
        for session_id, sandbox in sandboxes.items():
            try:
                await sandbox.aclose()
                await self._backend.stop(sandbox.id)
            except SandboxError as exc:
                logger.warning("could not stop the sandbox of %s: %s", session_id, exc)

    # ----------------------------------------------------------------------------- creation

    def _labels(self, session_id: str | None, egress_key: str | None) -> dict[str, str]:
        labels = {LABEL: "1", HOME_LABEL: self.home_label, INSTANCE_LABEL: self._instances.id}
        if session_id:
            labels[SESSION_LABEL] = session_id
        if egress_key:
            labels[EGRESS_LABEL] = egress_key
        return labels

    def _template(self, environment: Json, image: str) -> SandboxSpec:
        config = environment.get("config") or {}
        return SandboxSpec(
            image=image,
            name="",
            limits=limits_for(config.get("limits") or {}, self._settings.limits),
        )

    async def _create(
        self,
        template: SandboxSpec,
        name: str,
        policy: EgressPolicy | None,
        *,
        session_id: str | None,
        pool_env: str | None = None,
    ) -> Sandbox:
        socket_dir = None
        if policy is not None:
            socket_dir = str((await self.egress.open(name, policy)).parent)
        labels = self._labels(session_id, name if policy is not None else None)
        if pool_env:
            labels[POOL_LABEL] = pool_env
        spec = SandboxSpec(
            image=template.image,
            name=name,
            labels=labels,
            env=template.env,
            user=template.user,
            limits=template.limits,
            egress_socket_dir=socket_dir,
        )
        try:
            sandbox = await self._backend.create(spec)
        except BaseException:
            if policy is not None:
                with anyio.CancelScope(shield=True):
                    await self.egress.close(name)
            raise
        if policy is not None:
            self._egress_keys[sandbox.id] = name
        return sandbox

    async def provision(self, session: Json, environment: Json) -> Sandbox:
        """A sandbox for a new session: from the warm pool, or created now.

        Raises:
            ConflictError / InvalidRequestError / BackendUnavailableError: see
                `EnvironmentImages.image_for`.
            SandboxError: the backend failed.
        """
        image = await self.images.image_for(environment, wait=BUILD_WAIT_S)
        template = self._template(environment, image)
        policy = egress_policy(environment, session.get("agent"))
        name = f"ma-{session['id']}"
        taken = await self._pool.take(spec_key(template, repr(policy)), name)
        if taken is not None:
            sandbox, pool_name = taken
            if egress := self._egress_keys.pop(pool_name, None):
                self._egress_keys[sandbox.id] = egress
        else:
            sandbox = await self._create(template, name, policy, session_id=session["id"])
        self._adopt(session["id"], sandbox, template.limits)
        self._sandboxes[session["id"]] = sandbox
        self.fill_pool(environment, image, policy)
        return sandbox

    def fill_pool(self, environment: Json, image: str, policy: EgressPolicy | None) -> None:
        """Keep `warm_pool` ready sandboxes for this environment recipe (background)."""
        template = self._template(environment, image)
        key = spec_key(template, repr(policy))
        self._pool_keys[key] = environment["id"]

        async def make() -> Sandbox:
            return await self._create(
                template, WarmPool.new_name(), policy, session_id=None, pool_env=environment["id"]
            )

        self._pool.fill(key, make)

    async def prewarm(self, environment: Json) -> None:
        """After an environment is created or changed: build its image, then fill its pool."""
        if self._settings.warm_pool <= 0:
            return
        try:
            image = await self.images.image_for(environment, wait=REBUILD_WAIT_S)
        except Exception as exc:  # the build error reaches the user at start_session
            logger.info("not pre-warming %s: %s", environment.get("id"), exc)
            return
        policy = egress_policy(environment, None)
        current = spec_key(self._template(environment, image), repr(policy))
        stale = {
            k for k, env in self._pool_keys.items() if env == environment["id"] and k != current
        }
        # A changed environment gets a fresh pool: sandboxes of the old recipe are removed.
        await self._pool.retire(lambda key: key not in stale)
        for key in stale:
            self._pool_keys.pop(key, None)
        self.fill_pool(environment, image, policy)

    # ----------------------------------------------------------------------------- sessions

    async def forget(self, session_id: str) -> None:
        """Drop the cached handle (its sandbox is gone or broken); the next use re-attaches."""
        sandbox = self._sandboxes.pop(session_id, None)
        if sandbox is not None:
            await sandbox.aclose()

    async def sandbox_for(self, session_id: str, *, owner: bool = True) -> Sandbox:
        """The session's running sandbox: cached, re-attached, or re-created if it is gone.

        Only the owning process opens the egress socket (another process reading a file must
        not take the socket path over from the owner).
        """
        lock = self._locks.setdefault(session_id, anyio.Lock())
        async with lock:
            sandbox = self._sandboxes.get(session_id)
            if sandbox is not None:
                return sandbox
            record = await self._store.require(session_id)
            environment = await self._environment(record.session["environment_id"])
            policy = egress_policy(environment, record.session["agent"])
            name = record.sandbox_id or f"ma-{session_id}"
            info = await self._backend.inspect(name)
            if info is not None:
                egress_key = info.labels.get(EGRESS_LABEL)
                if owner and egress_key and policy is not None:
                    # The socket must exist before the container (re)starts: it is bind-mounted.
                    await self.egress.open(egress_key, policy)
                    self._egress_keys[name] = egress_key
                try:
                    sandbox = await self._backend.attach(name)
                except SandboxNotFound:
                    sandbox = None
            if sandbox is None:
                logger.warning("the sandbox of %s is gone; creating a new one", session_id)
                image = await self.images.image_for(environment, wait=REBUILD_WAIT_S)
                template = self._template(environment, image)
                sandbox = await self._create(
                    template, f"ma-{session_id}", policy if owner else None, session_id=session_id
                )
                await self._store.set_columns(session_id, sandbox_id=sandbox.id)
            # A stopped or re-created container has empty tmpfs mounts: put the files back.
            await self._restore_mounts(session_id, sandbox)
            config = environment.get("config") or {}
            self._adopt(
                session_id, sandbox, limits_for(config.get("limits") or {}, self._settings.limits)
            )
            self._sandboxes[session_id] = sandbox
            return sandbox

    def _adopt(self, session_id: str, sandbox: Sandbox, limits: Limits) -> None:
        """Give a session's sandbox its environment's current workspace limit (a pooled or
        older container may carry another), and have it put the session's uploads back if it
        ever restarts itself to free its processes."""
        if not isinstance(sandbox, ShellSandbox):
            return
        sandbox.workspace_limit = limits.workspace_bytes

        async def restore() -> None:
            await self._restore_mounts(session_id, sandbox)

        sandbox.after_restart = restore

    async def _restore_mounts(self, session_id: str, sandbox: Sandbox) -> None:
        """Write the session's mounted files (uploads) into the sandbox again."""
        mounts: list[tuple[str, Path]] = []
        for resource in await self._store.resources(session_id):
            _, blob = await self._files.blob_path(resource["file_id"])
            mounts.append((resource["mount_path"], blob))
        await write_mounts(sandbox, mounts)

    async def _environment(self, environment_id: str) -> Json:
        row = await self._store.db.read(
            lambda c: c.execute(
                "SELECT body FROM environments WHERE id = ?", (environment_id,)
            ).fetchone()
        )
        return json.loads(row[0]) if row else {}

    async def environment_of(self, session_id: str) -> Json:
        record = await self._store.require(session_id)
        return await self._environment(record.session["environment_id"])

    async def destroy(self, session_id: str, sandbox_id: str | None) -> None:
        sandbox = self._sandboxes.pop(session_id, None)
        self._output_index.pop(session_id, None)
        name = sandbox_id or f"ma-{session_id}"
        if sandbox is not None:
            await sandbox.aclose()
        info = await self._backend.inspect(name)
        await self._backend.remove(name)
        key = self._egress_keys.pop(name, None) or (info.labels.get(EGRESS_LABEL) if info else None)
        if key:
            await self.egress.close(key)

    async def stop(self, session_id: str, sandbox_id: str | None) -> None:
        sandbox = self._sandboxes.pop(session_id, None)
        name = sandbox_id or f"ma-{session_id}"
        if sandbox is not None:
            await sandbox.aclose()
        await self._backend.stop(name)
        key = self._egress_keys.pop(name, None)
        if key:
            await self.egress.close(key)

    async def _close_egress(self, sandbox: Sandbox) -> None:
        key = self._egress_keys.pop(sandbox.id, None)
        if key:
            await self.egress.close(key)

    # -------------------------------------------------------------------------------- files

    async def collect_outputs(self, session_id: str) -> list[tuple[str, bytes]]:
        """Store new or changed files under /mnt/session/outputs/ as the session's outputs.

        Files are found by size and mtime against the last collection, so unchanged ones are
        not read again (and content the store already has is not stored twice). The changed
        ones travel as one `tar` stream that is unpacked as it arrives, each regular file
        hashed straight into the blob store: the server holds `OUTPUT_STREAM_CHUNKS` exec frames
        and a 1 MiB copy buffer at most, whatever the outputs weigh. Member names must be the
        paths asked for; links, devices and directories are skipped and nothing is ever
        extracted on the host. Returns nothing for the caller to store: all is stored here.
        """
        sandbox = self._sandboxes.get(session_id)
        if sandbox is None:
            return []
        changed = await self._changed_outputs(session_id, sandbox)
        if not changed:
            return []
        stored = await stream_outputs(sandbox, self._files.blobs, list(changed))
        seen = self._output_index.setdefault(session_id, {})
        for path, (sha, size) in stored.items():
            await self._files.record_output_blob(session_id, path, sha, size)
            seen[path] = changed[path]
        return []

    async def _changed_outputs(self, session_id: str, sandbox: Sandbox) -> dict[str, str]:
        """Output path → "size mtime", for files new or changed since the last collection."""
        listing = await sandbox.exec(
            [
                "sh",
                "-c",
                f"cd {OUTPUTS_DIR} 2>/dev/null || exit 0; "
                "find . -type f -printf '%s %T@ %P\\0' 2>/dev/null | head -z -n 10000",
            ]
        )
        seen = self._output_index.get(session_id, {})
        changed: dict[str, str] = {}
        for entry in listing.stdout.split(b"\0"):
            size, _, rest = entry.partition(b" ")
            stamp, _, raw_path = rest.partition(b" ")
            try:
                path = raw_path.decode()
            except UnicodeDecodeError:
                logger.info("not collecting an output whose name is not UTF-8: %r", raw_path)
                continue
            if not path or not size.isdigit():
                continue
            if int(size) > MAX_OUTPUT_FILE:
                logger.info("not collecting %s of %s: over %d bytes", path, session_id, size)
                continue
            key = f"{int(size)} {stamp.decode(errors='replace')}"
            if seen.get(path) != key and len(changed) < MAX_OUTPUT_FILES:
                changed[path] = key
        return changed

    # ------------------------------------------------------------------------------ cleanup

    async def remove_orphans(self, known_sessions: Callable[[], Awaitable[set[str]]]) -> None:
        """Remove this data dir's containers that belong to no session, and dead pools.

        The sandboxes are listed before the sessions are read: a session started in between
        then has its sandbox outside the list, rather than a sandbox without its session.
        """
        found = await self._backend.list({LABEL: "1", HOME_LABEL: self.home_label})
        known = await known_sessions()
        for info in found:
            if info.name.startswith(POOL_PREFIX):
                owner = info.labels.get(INSTANCE_LABEL)
                if owner != self._instances.id and not self._instances.is_alive(owner):
                    logger.info("removing the pool sandbox %s of a stopped server", info.name)
                    await self._backend.remove(info.id)
                continue
            session_id = info.name.removeprefix("ma-")
            if session_id not in known:
                logger.info("removing orphan sandbox %s", info.name)
                await self._backend.remove(info.id)
                if key := info.labels.get(EGRESS_LABEL):
                    await self.egress.close(key)


async def write_mounts(sandbox: Sandbox, mounts: Sequence[tuple[str, Path]]) -> None:
    """Extract the files, read-only and owned by root, under /mnt/session/uploads/ in one go."""
    if not mounts:
        return

    def pack() -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path, blob in mounts:
                info = tar.gettarinfo(str(blob), arcname=posixpath.relpath(path, UPLOADS_DIR))
                info.mode, info.uid, info.gid, info.uname, info.gname = 0o444, 0, 0, "", ""
                with blob.open("rb") as data:
                    tar.addfile(info, data)
        return buffer.getvalue()

    payload = await anyio.to_thread.run_sync(pack)
    result = await sandbox.exec(
        ["tar", "-x", "-f", "-", "-C", UPLOADS_DIR, "--no-same-owner"],
        user="0",
        stdin=payload,
        timeout=300,
    )
    if result.exit_code != 0:
        reason = result.stderr.decode(errors="replace").strip()
        msg = f"mounting files failed: {reason or f'tar exit {result.exit_code}'}"
        raise SandboxError(msg, op="mount")


async def stream_outputs(
    sandbox: Sandbox, blobs: BlobStore, paths: Sequence[str]
) -> dict[str, tuple[str, int]]:
    """Stream `paths` (relative to /mnt/session/outputs) of `sandbox` into `blobs`.

    Returns path → (sha256, size) for each regular file that arrived whole; a file that
    vanished, turned into a link or grew past `MAX_OUTPUT_FILE` meanwhile is left out.
    """
    names = b"".join(b"./" + p.encode() + b"\0" for p in paths)
    send, receive = anyio.create_memory_object_stream[bytes](OUTPUT_STREAM_CHUNKS)
    argv = ["tar", "-c", "-f", "-", "-C", OUTPUTS_DIR, "--no-recursion", "--null", "-T", "-"]

    async def produce() -> None:
        async with send:
            try:
                result = await sandbox.exec_stream(argv, send.send, stdin=names, timeout=300)
            except anyio.BrokenResourceError:
                return  # the reader stopped early (it says why)
        if result.exit_code != 0:
            # Exit 1 or 2: some file changed or vanished while it was read; the rest is whole.
            reason = result.stderr.decode(errors="replace").strip()[-500:]
            logger.info("collecting outputs: tar exited %d: %s", result.exit_code, reason)

    def consume() -> dict[str, tuple[str, int]]:
        return store_members(_ChunkReader(receive), blobs, set(paths))

    stored: dict[str, tuple[str, int]] = {}
    async with anyio.create_task_group() as group:
        group.start_soon(produce)
        try:
            stored = await anyio.to_thread.run_sync(consume)
        finally:
            # Unblocks the producer if the reader gave up before the end.
            receive.close()
    return stored


class _ChunkReader(io.RawIOBase):
    """A blocking, read-only file (for a worker thread) over chunks an async task sends."""

    def __init__(self, receive: MemoryObjectReceiveStream[bytes]) -> None:
        super().__init__()
        self._receive = receive
        self._chunk = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._chunk and not self._eof:
            try:
                self._chunk = memoryview(anyio.from_thread.run(self._receive.receive))
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self._eof = True
        size = min(len(buffer), len(self._chunk))
        buffer[:size] = self._chunk[:size]
        self._chunk = self._chunk[size:]
        return size


def store_members(
    source: io.RawIOBase | io.BufferedIOBase, blobs: BlobStore, wanted: set[str]
) -> dict[str, tuple[str, int]]:
    """Hash each wanted regular file of the tar stream `source` into the blob store (blocking).

    The archive comes from the sandbox, so nothing in it is trusted: a member counts only if
    its normalised name is relative, stays below the archive's root and is one of `wanted`; only
    regular files are read at all, and only into content-addressed blobs.
    """
    stored: dict[str, tuple[str, int]] = {}
    try:
        with tarfile.open(fileobj=source, mode="r|") as tar:
            for member in tar:
                name = posixpath.normpath(member.name)
                if name.startswith(("/", "../")) or name in (".", ".."):
                    continue  # never a path under outputs, whatever the caller asked for
                if name not in wanted or name in stored or not member.isreg():
                    continue
                if member.size > MAX_OUTPUT_FILE:
                    continue
                data = tar.extractfile(member)
                if data is None:
                    continue
                try:
                    stored[name] = blobs.put_stream(data, limit=MAX_OUTPUT_FILE)
                except RequestTooLargeError:
                    continue
    except tarfile.TarError as exc:
        # A cut-off archive (the exec failed or timed out): keep what arrived whole.
        logger.warning("collecting outputs: the archive broke off: %s", exc)
    return stored
