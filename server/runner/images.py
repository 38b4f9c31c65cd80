"""Environment images: built once per distinct recipe, shared by every environment that has it.

A build starts when an environment is created or updated, runs in the supervisor's task group,
and is awaited (briefly) by `start_session`. Failures are remembered for a minute so a broken
package list does not rebuild on every call.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from sandbox.base import ImageRecipe, SandboxBackend
from sandbox.errors import ImageNotFound, SandboxError
from server.core.errors import BackendUnavailableError, ConflictError, InvalidRequestError
from server.settings import Settings

logger = logging.getLogger(__name__)

Json = dict[str, Any]
FAILURE_MEMORY_S = 60.0


@dataclass(slots=True)
class _Build:
    done: anyio.Event = field(default_factory=anyio.Event)
    started: float = field(default_factory=time.monotonic)
    image: str | None = None
    error: SandboxError | None = None
    finished: float | None = None


def recipe_for(environment: Json, settings: Settings) -> ImageRecipe | None:
    """The recipe of an environment's image, or None when the default image is used as is."""
    default_image = settings.image
    config = environment.get("config") or {}
    packages = {
        manager: tuple(specs)
        for manager, specs in (config.get("packages") or {}).items()
        if manager != "type" and specs
    }
    base = config.get("image") or default_image
    dockerfile = config.get("dockerfile")
    if base == default_image and not packages and not dockerfile:
        return None
    return ImageRecipe(
        base_image=base,
        packages=packages,
        dockerfile=dockerfile,
        build_args=dict(settings.build_args),
        ca_bundle=settings.ca_bundle,
        network=settings.build_network,
    )


def _key(recipe: ImageRecipe) -> str:
    return json.dumps(
        [recipe.base_image, sorted(recipe.packages.items()), recipe.dockerfile], sort_keys=True
    )


def _describe(recipe: ImageRecipe) -> str:
    parts = [f"{m}: {' '.join(specs)}" for m, specs in recipe.packages.items()]
    return "; ".join(parts) or recipe.base_image


class EnvironmentImages:
    """Builds environment images in the background and hands out their names."""

    def __init__(self, backend: SandboxBackend, settings: Settings) -> None:
        self._backend = backend
        self._settings = settings
        self._builds: dict[str, _Build] = {}
        self._task_group: anyio.abc.TaskGroup | None = None

    def bind(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group

    def prepare(self, environment: Json) -> None:
        """Start building the environment's image if it needs one (returns at once)."""
        recipe = recipe_for(environment, self._settings)
        if recipe is not None:
            self._start(recipe)

    def _start(self, recipe: ImageRecipe) -> _Build:
        key = _key(recipe)
        build = self._builds.get(key)
        stale = (
            build is not None
            and build.error is not None
            and build.finished is not None
            and time.monotonic() - build.finished > FAILURE_MEMORY_S
        )
        if build is None or stale:
            build = self._builds[key] = _Build()
            if self._task_group is None:
                msg = "environment images cannot be built before the server has started"
                raise BackendUnavailableError(msg)
            self._task_group.start_soon(self._run, recipe, build)
        return build

    async def _run(self, recipe: ImageRecipe, build: _Build) -> None:
        logger.info("building the environment image for %s", _describe(recipe))
        try:
            build.image = await self._backend.prepare_image(recipe)
        except SandboxError as exc:
            logger.warning("environment image build failed: %s", exc)
            build.error = exc
        finally:
            build.finished = time.monotonic()
            build.done.set()

    async def image_for(self, environment: Json, *, wait: float) -> str:
        """The image sessions of `environment` start from, waiting up to `wait` s for a build.

        Raises:
            ConflictError: the build is still running after `wait` seconds.
            InvalidRequestError: the build failed (the message names the step and its output).
            BackendUnavailableError: the base image is missing or Docker is unreachable.
        """
        recipe = recipe_for(environment, self._settings)
        if recipe is None:
            return self._settings.image
        build = self._start(recipe)
        with anyio.move_on_after(wait):
            await build.done.wait()
        if not build.done.is_set():
            elapsed = time.monotonic() - build.started
            msg = (
                f"environment {environment['id']} is still building its image "
                f"({_describe(recipe)}; {elapsed:.0f} s so far). Call start_session again in "
                "a minute"
            )
            raise ConflictError(msg)
        if build.error is not None:
            if isinstance(build.error, ImageNotFound):
                raise BackendUnavailableError(str(build.error)) from build.error
            msg = (
                f"the image of environment {environment['id']} failed to build: {build.error}. "
                "Fix its packages with update_environment"
            )
            raise InvalidRequestError(msg) from build.error
        assert build.image is not None
        return build.image
