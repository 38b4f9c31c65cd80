"""A PEP 503 package index on loopback serving wheels built in the test (no network needed)."""

from __future__ import annotations

import base64
import hashlib
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType


def build_wheel(directory: Path, name: str, version: str, module_source: str) -> Path:
    """A pure-Python wheel whose module `name` (with `-` → `_`) has `module_source`."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": module_source.encode(),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


class PackageIndex:
    """Serves `/simple/<name>/` pages and the wheels themselves; counts requests."""

    def __init__(self, wheels: list[Path]) -> None:
        self._wheels = {w.name: w for w in wheels}
        self.requests: list[str] = []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                index.requests.append(self.path)
                body, kind = index._page(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", kind)
                self.end_headers()
                self.wfile.write(body or b"not found")

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/simple/"

    def _page(self, path: str) -> tuple[bytes | None, str]:
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] == "files" and parts[1] in self._wheels:
            return self._wheels[parts[1]].read_bytes(), "application/octet-stream"
        if len(parts) == 2 and parts[0] == "simple":
            project = parts[1].replace("_", "-").lower()
            links = [
                f'<a href="/files/{w}">{w}</a>'
                for w in self._wheels
                if w.split("-")[0].replace("_", "-").lower() == project
            ]
            if links:
                return f"<html><body>{''.join(links)}</body></html>".encode(), "text/html"
        return None, "text/plain"

    def __enter__(self) -> PackageIndex:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
