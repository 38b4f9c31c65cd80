"""Backend selection: `docker`, `bubblewrap`, or `auto` (Docker when it answers, else bubblewrap).

`auto` decides on first use, not at start-up: probing Docker means importing docker-py and a
round trip to the daemon, which an MCP client's handshake should not wait for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import anyio

from .base import ImageRecipe, Sandbox, SandboxBackend, SandboxInfo, SandboxSpec
from .errors import SandboxError, SandboxUnavailable

logger = logging.getLogger(__name__)

BackendName = Literal["docker", "bubblewrap", "auto"]


def make_backend(name: BackendName, *, docker_host: str | None = None) -> SandboxBackend:
    """The backend called `name` (see the module docstring for `auto`)."""
    if name == "docker":
        from .docker import DockerBackend

        return DockerBackend(docker_host)
    if name == "bubblewrap":
        from .bubblewrap import BubblewrapBackend

        return BubblewrapBackend()
    return AutoBackend(docker_host=docker_host)


class AutoBackend:
    """Delegates to Docker when its daemon answers, else to bubblewrap."""

    name = "auto"

    def __init__(self, *, docker_host: str | None = None) -> None:
        self._docker_host = docker_host
        self._chosen: SandboxBackend | None = None
        self._lock = anyio.Lock()

    async def chosen(self) -> SandboxBackend:
        """The backend in use, choosing it on first call.

        Raises:
            SandboxUnavailable: neither Docker nor bubblewrap can be used (says how to fix it).
        """
        async with self._lock:
            if self._chosen is not None:
                return self._chosen
            from .bubblewrap import BubblewrapBackend
            from .docker import DockerBackend

            docker = DockerBackend(self._docker_host)
            try:
                await docker.ping()
                self._chosen = docker
            except SandboxError as docker_problem:
                await docker.aclose()
                bwrap = BubblewrapBackend()
                try:
                    await bwrap.ping()
                except SandboxError as bwrap_problem:
                    msg = (
                        f"no sandbox backend is usable: Docker: {docker_problem}; bubblewrap: "
                        f"{bwrap_problem}. Start Docker (or set DOCKER_HOST), or install "
                        "bubblewrap and run as root, or set MANAGED_AGENTS_SANDBOX"
                    )
                    raise SandboxUnavailable(msg, op="auto") from bwrap_problem
                logger.info("Docker is not reachable (%s); using bubblewrap", docker_problem)
                self._chosen = bwrap
            return self._chosen

    async def ping(self) -> str:
        backend = await self.chosen()
        return f"{backend.name}: {await backend.ping()}"

    async def image_present(self, image: str) -> bool:
        return await (await self.chosen()).image_present(image)

    async def prepare_image(self, recipe: ImageRecipe) -> str:
        return await (await self.chosen()).prepare_image(recipe)

    async def create(self, spec: SandboxSpec) -> Sandbox:
        return await (await self.chosen()).create(spec)

    async def inspect(self, sandbox_id: str) -> SandboxInfo | None:
        return await (await self.chosen()).inspect(sandbox_id)

    async def attach(self, sandbox_id: str) -> Sandbox:
        return await (await self.chosen()).attach(sandbox_id)

    async def list(self, labels: Mapping[str, str]) -> list[SandboxInfo]:
        return await (await self.chosen()).list(labels)

    async def rename(self, sandbox: Any, name: str) -> Sandbox:
        return await (await self.chosen()).rename(sandbox, name)

    async def stop(self, sandbox_id: str) -> None:
        await (await self.chosen()).stop(sandbox_id)

    async def remove(self, sandbox_id: str) -> None:
        await (await self.chosen()).remove(sandbox_id)

    async def aclose(self) -> None:
        if self._chosen is not None:
            await self._chosen.aclose()
