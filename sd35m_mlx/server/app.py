"""The ASGI app: routes of both API dialects, the page, health, errors in each dialect's shape."""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

import sd35m_mlx

from ..lora.library import LoraLibrary
from ..record import MEDIA_TYPES, Settings
from ..sampling.finite import NonFiniteError
from ..validation import InvalidInput, validate_generation
from . import a1111_api, a1111_internal, controlnets, loras, openai_api, studio
from .controlnets import ControlNetLibrary
from .errors import RequestError, ShuttingDown, error_body
from .files import open_or_404, streamed
from .guards import ApiKey, BodyLimit, HostOrigin, UrlSigner
from .history import History
from .jobs import CANCELLED, FAILED, Job, Worker
from .loras import resolve as resolve_loras
from .models import checkpoints, choose
from .spec import Limits, ModelInfo, Spec, check, generate_kwargs
from .uploads import DEFAULT_MAX_PIXELS

log = logging.getLogger("sd35m_mlx.server")
VERSION = f"sd35m-mlx {sd35m_mlx.__version__}"
# as both dialects' messages say (only A1111 sets padding_mask_crop)
API_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance_scale",
             "padding_mask_crop": "inpaint_full_res_padding"}  # fmt: skip
_FILE_NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpeg|webp)$")
URL_LIFETIME_S = 3600
PAGE_FILES = {"css": "text/css; charset=utf-8", "js": "text/javascript; charset=utf-8"}  # the page's studio.*


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "stable-diffusion-3.5-medium"  # what /v1/models and sd-models report; never a local path
    api_key: str | None = None
    max_queue: int = 8  # jobs waiting behind the running one; more -> 503 with Retry-After
    max_body_bytes: int = 64 << 20
    max_upload_pixels: int = DEFAULT_MAX_PIXELS
    limits: Limits = field(default_factory=Limits)
    # the history: A1111 save_images writes here, /studio/history lists it (serve's default: ~/Pictures/sd35m-mlx);
    # None: no history. Made at the first save. response_format="url" images never go here (a temporary folder)
    output_dir: str | None = None
    load_options: dict = field(default_factory=dict)  # quantize, t5_quantize: recorded in PNG metadata
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides IPs, loopback and this machine's names
    cors_origins: tuple[str, ...] = ()  # web pages on other origins allowed to call us (CORS)
    read_timeout: float = 30.0  # seconds for a request's headers and body to arrive (run.py)
    signed_urls: bool = False  # with api_key: response_format="url" URLs carry ?exp=&sig= and open without the key
    lora_dir: str | None = None  # the folder <lora:NAME> tags name (serve --lora-dir); None: tags are refused
    lora_cache_bytes: int | None = None  # LoRAs kept loaded between requests (serve --lora-cache-mb); None: default
    # public title -> () -> pipeline: the models requests may switch to (server/models.py); model_name is the first
    loaders: dict = field(default_factory=dict)
    # public name -> source (Hub id, folder or file) of the ControlNets requests may name (serve --controlnet);
    # each loaded on first use, least recently used unloaded past a budget (server/controlnets.py)
    controlnets: dict = field(default_factory=dict)


class Server:
    """What the routes share: the worker, the model's description, the history, the URL images' folder."""

    def __init__(self, pipe, config: ServerConfig):
        self.config = config
        self.served = checkpoints(config.model_name, config.loaders)

        def describe(pipe, title: str) -> ModelInfo:
            return ModelInfo.of(pipe, title, **config.load_options)

        model = describe(pipe, config.model_name)
        self.worker = Worker(pipe, model, VERSION, config.max_queue, self.served, describe, config.lora_cache_bytes)
        self.signer = UrlSigner(config.api_key) if config.api_key and config.signed_urls else None
        self.loras = LoraLibrary(config.lora_dir) if config.lora_dir else None
        self.controlnets = ControlNetLibrary(config.controlnets, config.load_options.get("quantize"))
        self.history = History(config.output_dir) if config.output_dir else None
        # response_format="url" images: API artefacts that expire in an hour, kept apart from the history
        self._tmp = tempfile.TemporaryDirectory(prefix="sd35m-mlx-serve-")
        self.url_dir = Path(self._tmp.name)

    @property
    def pipe(self):
        """The resident model's pipeline (it changes when a request switches models)."""
        return self.worker.pipe

    @property
    def model(self) -> ModelInfo:
        return self.worker.model

    async def switch(self, title: str) -> None:
        """Make `title` the resident model, in the worker's thread after the jobs queued before."""
        spec = Spec(Settings(prompt=""), seeds=[], checkpoint=choose(self.served, title).title, restore=False)
        job = self.worker.submit(spec, asyncio.get_running_loop())
        await job.wait()
        if job.state == FAILED:
            if isinstance(job.error, RequestError):
                raise job.error
            raise RequestError(f"loading {title} failed; see the server's log", "sd_model_checkpoint", 500)

    def check(self, spec: Spec) -> Spec:
        """The server's limits, then generate()'s own checks: a bad request fails now, not after the queue."""
        check(spec, self.config.limits, self.model.max_side)
        resolve_loras(spec, self.loras)
        if hasattr(self.pipe, "limits"):  # test doubles have none
            kwargs = generate_kwargs(spec, spec.seeds[0], self.model)
            try:
                validate_generation(self.pipe.limits, names=API_NAMES, **kwargs)
            except InvalidInput as e:
                raise RequestError(str(e).splitlines()[0], str(e).split()[0]) from None
        return spec

    async def run(self, spec: Spec, request: Request) -> Job:
        """Queue a checked spec and wait for it; a client that goes away cancels its job."""
        job = self.worker.submit(self.check(spec), asyncio.get_running_loop())
        try:
            await job.wait(request.is_disconnected)
        except asyncio.CancelledError:  # the server task itself was cancelled
            self.worker.cancel(job, "request cancelled")
            raise
        if not job.done:  # the client left; nobody reads an answer
            self.worker.cancel(job, "client disconnected")
            raise RequestError("client disconnected", status=499)
        if job.state == FAILED:
            if isinstance(job.error, RequestError):
                raise job.error
            if isinstance(job.error, NonFiniteError):  # says why in one line, with no path or traceback
                raise RequestError(f"generation failed: {job.error}", status=500)
            # the details (paths, traceback) stay in the server's log
            raise RequestError(f"generation failed ({type(job.error).__name__}); see the server's log", status=500)
        if job.state == CANCELLED and job.cancel_reason == "server shutting down":
            raise ShuttingDown()
        return job

    def save(self, png: bytes, suffix: str = "png") -> str:
        """Store an image for response_format="url"; its unguessable name is all a URL reveals. Images
        older than URL_LIFETIME_S are removed (as OpenAI's URLs expire after an hour), only ours."""
        now = time.time()
        for old in self.url_dir.iterdir():
            try:
                if _FILE_NAME.match(old.name) and now - old.stat().st_mtime > URL_LIFETIME_S:
                    old.unlink()
            except OSError:  # removed meanwhile, or not ours to remove
                pass
        name = f"{uuid.uuid4().hex}.{suffix}"
        (self.url_dir / name).write_bytes(png)
        return name

    def image_url(self, request: Request, name: str) -> str:
        """The URL of a saved image; signed (usable without the key until the file expires) when enabled."""
        url = request.url_for("image_file", name=name)
        if self.signer is None:
            return str(url)
        return f"{url}?{self.signer.query(url.path, URL_LIFETIME_S)}"

    def close(self) -> None:
        self.worker.close()
        self._tmp.cleanup()


def create_app(pipe, config: ServerConfig | None = None, **options) -> FastAPI:
    """The app serving `pipe` (a loaded StableDiffusion35). `options` override ServerConfig fields."""
    config = config or ServerConfig()
    if options:
        config = ServerConfig(**{**config.__dict__, **options})
    server = Server(pipe, config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(server.close)

    app = FastAPI(title="sd35m-mlx", version=sd35m_mlx.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)  # fmt: skip
    app.state.server = server
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    # outside the body limit: 401 comes before reading a body
    app.add_middleware(ApiKey, key=config.api_key, signer=server.signer)
    if config.cors_origins:  # outside the key check: a browser's preflight carries no key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], max_age=600)  # fmt: skip
    # outermost: a foreign Host or Origin is refused before anything else runs
    app.add_middleware(HostOrigin, allowed_hosts=config.allowed_hosts, cors_origins=config.cors_origins)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return JSONResponse(error_body(request.url.path, exc.status, exc.message, exc.param), exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        status = 422 if request.url.path.startswith("/sdapi/") else 400
        message, param = describe_validation(exc)
        return JSONResponse(error_body(request.url.path, status, message, param), status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse(error_body(request.url.path, exc.status_code, str(exc.detail)), exc.status_code,
                            getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(Exception)
    async def server_fault(request: Request, exc: Exception):
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return JSONResponse(error_body(request.url.path, 500, f"internal error: {type(exc).__name__}"), 500)

    @app.get("/health")
    async def health():
        w = server.worker
        return {"status": "shutting down" if w.closed else "ok", "busy": w.current is not None, "queued": w.queued}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_static("index.html"))

    @app.get("/studio.{ext}")
    async def page_file(ext: str):
        if ext not in PAGE_FILES:
            raise RequestError("no such file", "ext", 404)
        return Response(_static(f"studio.{ext}"), media_type=PAGE_FILES[ext])

    @app.get("/v1/images/files/{name}")
    async def image_file(name: str):
        path = server.url_dir / name
        if not _FILE_NAME.match(name):
            raise RequestError("no such image", "name", 404)
        f = await asyncio.to_thread(open_or_404, path, "no such image")  # expired meanwhile: a 404, not a 500
        return streamed(f, MEDIA_TYPES[name.rsplit(".", 1)[1].upper()])

    app.include_router(openai_api.router(server))
    app.include_router(a1111_api.router(server))
    app.include_router(a1111_internal.router(server))
    app.include_router(loras.router(server))
    app.include_router(controlnets.router(server))
    app.include_router(studio.router(server))
    return app


def _static(name: str) -> str:
    """A file of the page (package data in static/, as the wheel ships it)."""
    return resources.files(__package__).joinpath("static", name).read_text("utf-8")


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's first complaint as one line naming the field."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if e.get("type") == "missing":
        return f"{param} is required", param
    return (f"{param}: {e.get('msg', 'invalid value')}" if param else str(e.get("msg", "invalid request"))), param
