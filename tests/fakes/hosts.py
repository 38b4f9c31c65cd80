"""Test hosts: web servers in containers on an internal Docker network (traffic stays local)."""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from collections.abc import Iterator, Sequence

import docker
import docker.errors

from tests.conftest import IMAGE


def _wait_for_port(host: str, port: int, timeout: float = 30) -> None:
    """Start-up plumbing: the servers need a moment before they accept connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def web_hosts(names: Sequence[str]) -> Iterator[dict[str, str]]:
    """Start `python3 -m http.server 80` hosts answering `hello from <name>`; yield their IPs.

    Everything is removed afterwards, whatever happens.
    """
    client = docker.from_env(timeout=60)
    run = secrets.token_hex(4)
    labels = {"managed-agents-mcp.test": "hosts", "managed-agents-mcp.test.run": run}
    try:
        network = client.networks.create(
            f"ma-hosts-{run}", driver="bridge", internal=True, labels=labels
        )
        ips: dict[str, str] = {}
        for name in names:
            script = (
                f"mkdir -p /srv && echo 'hello from {name}' > /srv/index.html && cd /srv && "
                "exec python3 -m http.server 80"
            )
            container = client.containers.run(
                IMAGE,
                ["sh", "-c", script],
                name=f"ma-host-{name}-{run}",
                user="0",
                network=network.name,
                labels=labels,
                detach=True,
            )
            container.reload()
            ips[name] = container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]
        for ip in ips.values():
            _wait_for_port(ip, 80)
        yield ips
    finally:
        selector: dict[str, str | list[str] | bool] = {
            "label": f"managed-agents-mcp.test.run={run}"
        }
        for container in client.containers.list(all=True, filters=selector):
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
        for stale in client.networks.list(filters=selector):
            with contextlib.suppress(docker.errors.APIError):
                stale.remove()
        client.close()
