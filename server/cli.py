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
from typing import Any

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
    serve.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP: address to bind")
    serve.add_argument("--port", type=int, default=8765, help="HTTP: port to bind")
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="HTTP: another Host header to accept (besides loopback names)",
    )
    serve.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="HTTP: another browser Origin to accept (besides loopback)",
    )
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="HTTP: no token (refused unless bound to a loopback address)",
    )

    commands.add_parser("token", help="print the HTTP token (created on first use)")

    sessions = commands.add_parser("sessions", help="list sessions: status, age, last message")
    sessions.add_argument("--all", action="store_true", help="include archived sessions")
    sessions.add_argument("--limit", type=int, default=30)
    sessions.add_argument("--json", action="store_true", help="one JSON object per line")

    tail = commands.add_parser("tail", help="follow a session's events live (Ctrl-C to stop)")
    tail.add_argument("session_id")
    tail.add_argument("--json", action="store_true", help="one JSON event per line")
    tail.add_argument("--history", action="store_true", help="print past events first")

    shell = commands.add_parser("shell", help="open an interactive shell in a session's sandbox")
    shell.add_argument("session_id")

    files = commands.add_parser("files", help="list a session's output files, or download them")
    files.add_argument("session_id")
    files.add_argument("--download", type=Path, metavar="DIR", help="save them all into DIR")

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
    if args.command == "token":
        return _token()
    if args.command in ("sessions", "tail", "shell", "files"):
        return _human(args)
    if args.command == "doctor":
        return _doctor()
    return _image_build(args)


def _serve(args: argparse.Namespace) -> int:
    from server.app import build_server
    from server.settings import Settings

    settings = Settings.from_env()
    if args.transport == "http":
        return _serve_http(args, settings)
    server = build_server(settings)
    logger.info("serving over stdio; data dir %s", settings.home)
    server.run("stdio")
    return 0


def _serve_http(args: argparse.Namespace, settings: Any) -> int:
    import anyio

    from server.http import is_loopback, load_token

    if not is_loopback(args.host) and args.no_auth:
        sys.stderr.write(
            f"refusing to serve on {args.host} without a token: --no-auth is only allowed on "
            "a loopback address\n"
        )
        return 2
    token = None if args.no_auth else load_token(settings.home, settings.token)
    hosts = list(args.allowed_host)
    if not is_loopback(args.host) and args.host not in ("0.0.0.0", "::"):
        hosts.append(args.host)

    async def run() -> None:
        import uvicorn

        from server.app import build_server, open_services
        from server.http import build_http_app
        from server.rest import end_streams, routes

        class Server(uvicorn.Server):
            async def shutdown(self, sockets: Any = None) -> None:
                # uvicorn waits for open responses, and REST event streams never end alone.
                end_streams(app)
                await super().shutdown(sockets)

        async with open_services(settings) as services:
            app = build_http_app(
                build_server(settings, services=services),
                token=token,
                allowed_hosts=hosts,
                allowed_origins=args.allowed_origin,
                routes=routes(services),
            )
            config = uvicorn.Config(
                app, host=args.host, port=args.port, log_config=None, log_level="warning"
            )
            logger.info(
                "serving MCP at http://%s:%d/mcp%s; data dir %s",
                args.host,
                args.port,
                "" if token is None else " (token: `managed-agents-mcp token`)",
                settings.home,
            )
            await Server(config).serve()

    anyio.run(run)
    return 0


def _human(args: argparse.Namespace) -> int:
    from server import human
    from server.settings import Settings

    settings = Settings.from_env()
    if args.command == "sessions":
        return human.run(human.sessions_command, settings, args.all, args.limit, args.json)
    if args.command == "tail":
        return human.run(human.tail_command, settings, args.session_id, args.json, args.history)
    if args.command == "shell":
        return human.run(human.shell_command, settings, args.session_id)
    return human.run(human.files_command, settings, args.session_id, args.download)


def _token() -> int:
    from server.http import load_token
    from server.settings import Settings

    settings = Settings.from_env()
    _write(load_token(settings.home, settings.token))
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
