"""The `managed-agents-mcp` command: `serve`, `doctor` and `image build`.

Only the standard library is imported at module level: `serve` must answer an MCP client's
first requests fast, so heavy packages (anthropic, docker) load when first needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("managed_agents")


def _configure_logging(level: str) -> None:
    # stdout belongs to the MCP protocol in stdio mode: every log line goes to stderr.
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _write(line: str) -> None:
    """Human output of the non-protocol commands (doctor, image)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="managed-agents-mcp",
        description="Self-hosted Claude Managed Agents as an MCP server (Docker-sandboxed).",
    )
    parser.add_argument("--log-level", default=os.environ.get("MANAGED_AGENTS_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the MCP server (stdio by default)")
    serve.add_argument("--transport", choices=["stdio"], default="stdio")

    commands.add_parser("doctor", help="check Docker, the sandbox image, the API key, the data dir")

    image = commands.add_parser("image", help="manage the sandbox image")
    image_commands = image.add_subparsers(dest="image_command", required=True)
    build = image_commands.add_parser("build", help="build the default sandbox image")
    build.add_argument(
        "--offline",
        action="store_true",
        help="no registry: debootstrap from a Debian mirror, then docker import",
    )
    build.add_argument("--tag", default=None, help="image tag (default: MANAGED_AGENTS_IMAGE)")
    build.add_argument("--mirror", default=None, help="Debian mirror for --offline")
    build.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where --offline keeps its root filesystem between builds",
    )

    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    if args.command == "serve":
        return _serve(args)
    if args.command == "doctor":
        return _doctor()
    return _image_build(args)


def _serve(args: argparse.Namespace) -> int:
    from server.app import build_server
    from server.settings import Settings

    settings = Settings.from_env()
    server = build_server(settings)
    logger.info("serving over %s; data dir %s", args.transport, settings.home)
    server.run("stdio")
    return 0


def _doctor() -> int:
    import anyio

    from server.settings import Settings

    settings = Settings.from_env()
    checks: list[tuple[bool, str, str]] = []

    async def sandbox_checks() -> None:
        from sandbox.bubblewrap import BubblewrapBackend
        from sandbox.docker import DockerBackend
        from sandbox.errors import SandboxError

        docker_problem = bwrap_problem = None
        if settings.sandbox in ("auto", "docker"):
            backend = DockerBackend(settings.docker_host)
            try:
                version = await backend.ping()
                where = settings.docker_host or "default socket"
                checks.append((True, f"sandbox: {version} at {where}", ""))
                present = await backend.image_present(settings.image)
                checks.append(
                    (
                        present,
                        f"image {settings.image}: {'present' if present else 'missing'}",
                        "run `managed-agents-mcp image build` (no registry: `image build "
                        "--offline`), or set MANAGED_AGENTS_IMAGE",
                    )
                )
                return
            except SandboxError as exc:
                docker_problem = str(exc)
            finally:
                await backend.aclose()
        if settings.sandbox in ("auto", "bubblewrap"):
            try:
                version = await BubblewrapBackend().ping()
                note = f" (Docker: {docker_problem})" if docker_problem else ""
                checks.append((True, f"sandbox: {version}{note}", ""))
                return
            except SandboxError as exc:
                bwrap_problem = str(exc)
        problems = "; ".join(
            p
            for p in (
                f"docker: {docker_problem}" if docker_problem else None,
                f"bubblewrap: {bwrap_problem}" if bwrap_problem else None,
            )
            if p
        )
        checks.append(
            (
                False,
                f"sandbox ({settings.sandbox}): {problems}",
                "start Docker or set DOCKER_HOST (or install bubblewrap and run as root); "
                "MANAGED_AGENTS_SANDBOX picks the backend",
            )
        )

    anyio.run(sandbox_checks)
    if settings.anthropic_api_key:
        target = settings.anthropic_base_url or "https://api.anthropic.com"
        checks.append((True, f"model API: key set, base URL {target}", ""))
    elif settings.anthropic_base_url:
        checks.append((True, f"model API: base URL {settings.anthropic_base_url} (no key)", ""))
    else:
        checks.append(
            (
                False,
                "model API: ANTHROPIC_API_KEY is not set",
                "set ANTHROPIC_API_KEY (or ANTHROPIC_BASE_URL for a compatible endpoint)",
            )
        )
    checks.append(_check_home(settings.home))
    for ok, text, fix in checks:
        _write(f"{'ok  ' if ok else 'FAIL'} {text}" + ("" if ok else f" -> fix: {fix}"))
    return 0 if all(ok for ok, _, _ in checks) else 1


def _check_home(home: Path) -> tuple[bool, str, str]:
    fix = "set MANAGED_AGENTS_HOME to a directory you can write"
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / ".doctor-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return False, f"data dir {home}: not writable ({exc.strerror})", fix
    return True, f"data dir {home}: writable", ""


def _image_build(args: argparse.Namespace) -> int:
    from sandbox import images
    from sandbox.errors import SandboxError
    from server.settings import Settings

    settings = Settings.from_env()
    tag = args.tag or settings.image
    try:
        if args.offline:
            built = images.build_offline(
                tag,
                cache_dir=args.cache_dir,
                mirror=args.mirror or images.DEFAULT_MIRROR,
                docker_host=settings.docker_host,
            )
        else:
            built = images.build_from_dockerfile(tag, docker_host=settings.docker_host)
    except SandboxError as exc:
        _write(f"FAIL image build: {exc}")
        return 1
    _write(f"ok   built {built}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
