"""gcp-storage-emulator with three behaviours of Cloud Storage that it lacks and that this project relies on.

- A download carries the object's generation in the `x-goog-generation` header.
  tensorstore (under orbax) reads it; without it every checkpoint read fails
  with "Malformed StorageGeneration".
- An upload honours the `ifGenerationMatch` precondition (0: only if the object
  does not exist), answering 412 otherwise. The run lock creates its object
  this way; the emulator alone overwrites.
- Bursts of concurrent requests are accepted. The emulator's server, with a
  listen backlog of 5, drops the connections of a burst of concurrent range
  reads (fsspec's cat_ranges), which then wait for TCP's SYN retries
  (minutes). Here each connection gets a thread, and the requests are handled
  one at a time (the emulator's state, e.g. of resumable uploads, is not
  thread-safe: two concurrent uploads lost one).

Runs as the emulator's own command: python tests/gcs_emulator.py start --host 127.0.0.1 --port P --in-memory ...;
`start` does that on a free port, and `client_environment` points gcsfs and tensorstore at it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from http import HTTPStatus
from http.server import ThreadingHTTPServer

from gcp_storage_emulator import __main__ as emulator_main
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

from jax_advprune.children import die_with_parent

_original_download, _original_insert, _original_handle = objects.download, objects.insert, server.Router.handle
_one_request_at_a_time = threading.Lock()


def _current_generation(storage, bucket: str, name: str) -> str:
    """The object's generation, or '0' when it does not exist (GCS's convention for preconditions)."""
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def download(request, response, storage, *args, **kwargs):
    _original_download(request, response, storage, *args, **kwargs)
    generation = _current_generation(storage, request.params["bucket_name"], request.params["object_id"])
    if generation != "0":
        response["x-goog-generation"] = generation


def insert(request, response, storage, *args, **kwargs):
    wanted = (request.query.get("ifGenerationMatch") or [None])[0]
    if wanted is None:
        return _original_insert(request, response, storage, *args, **kwargs)
    name = (request.query.get("name") or [None])[0]
    if name is None and isinstance(request.data, dict):
        name = (request.data.get("meta") or {}).get("name")
    # Requests run one at a time (handle below): the check and the write cannot interleave with another upload.
    if name is not None and _current_generation(storage, request.params["bucket_name"], name) != str(wanted):
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json(
            {"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}}
        )
        return
    return _original_insert(request, response, storage, *args, **kwargs)


class _ConcurrentServer(ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True


def _serve(self) -> None:
    """server.APIThread.run on a threading server with a deep listen backlog."""
    self._httpd = _ConcurrentServer((self._host, self._port), partial(server.RequestHandler, self._storage))
    self.is_running.set()
    self._httpd.serve_forever()


def handle(self, method) -> None:
    with _one_request_at_a_time:
        _original_handle(self, method)


def patch() -> None:
    """Routes the emulator's download and insert handlers through the wrappers above; accepts bursts of
    connections and handles their requests one at a time."""
    server.APIThread.run = _serve
    server.Router.handle = handle
    objects.download, objects.insert = download, insert  # objects.get and the router call these by name
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is _original_download:
                handlers[method] = download
            elif handler is _original_insert:
                handlers[method] = insert


def client_environment(url: str) -> dict[str, str]:
    """What gcsfs and tensorstore (orbax) need to use the emulator at `url`, inherited by subprocesses: gcsfs
    anonymous (no credential lookup) and without its gRPC bucket-type probe (which waits 60 s on an emulator)."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GS_TOKEN": "anon",
    }


def start(bucket: str, timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Starts this emulator in memory on a free port of 127.0.0.1 with `bucket` created -> (process, its URL); it dies
    with the process that started it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_process = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--default-bucket",
            bucket,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent(),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=1)
            return server_process, url
        except OSError:
            if server_process.poll() is not None or time.time() > deadline:
                server_process.kill()
                raise RuntimeError(
                    "the GCS emulator did not start (gcp-storage-emulator is in the [test] extra)"
                ) from None
            time.sleep(0.1)


if __name__ == "__main__":
    patch()
    sys.exit(emulator_main.main(sys.argv[1:]))
