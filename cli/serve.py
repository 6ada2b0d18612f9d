"""`sd35m-mlx serve`: load the model once and serve it over HTTP (OpenAI Images API, A1111 /sdapi/v1, a web page)."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import click

from . import model as model_io
from .errors import RunError, UsageError, one_line
from .options import generate_options
from .output import check_writable

DEFAULT_OUTPUT_DIR = "~/Pictures/sd35m-mlx"
# The generate command's options that choose and load the model; serve takes them as they are.
MODEL_OPTIONS = ("model", "revision", "t5", "quantize", "t5_quantize", "low_memory", "dtype")


def model_options(f):
    """Attach the generate command's model options (same names, defaults and help) to `f`."""
    probe = generate_options(lambda: None)
    for param in probe.__click_params__:  # click keeps them in reverse order, and so does appending here
        if param.name == "model":  # serve takes several: clients switch between them (server/models.py)
            help = (
                f"{param.help} Repeatable: the first is loaded at start, clients switch to the others by name "
                "(A1111 sd_model_checkpoint), one resident at a time, each loaded with the same options."
            )
            param = click.Option(["--model"], multiple=True, default=(param.default,), help=help)
        if param.name in MODEL_OPTIONS:
            f.__click_params__ = [*getattr(f, "__click_params__", []), param]
    return f


def public_name(model: str) -> str:
    """What clients see as the model's name: a Hub id as is, a local path by its last part only."""
    path = Path(model).expanduser()
    return path.name if path.exists() or path.is_absolute() else model


def controlnet_names(sources: tuple[str, ...]) -> dict[str, str]:
    """--controlnet sources by public name (server/controlnets.py): a local one must exist, names must differ."""
    from sd35m_mlx.loading.hub import is_hub_id
    from sd35m_mlx.server.controlnets import public_name as controlnet_name

    named: dict[str, str] = {}
    for source in sources:
        if not Path(source).expanduser().exists() and not is_hub_id(source):
            raise UsageError(f"--controlnet {source}: no such folder or file, and not a Hub id (owner/name)")
        name = controlnet_name(source)
        if name in named:
            raise UsageError(f"--controlnet: {named[name]} and {source} would both be named {name!r}; rename one")
        named[name] = source
    return named


def check_output_dir(folder: Path) -> None:
    """An --output-dir given: made if missing, and it must take files."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output-dir {folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir {folder}: cannot create it: {e.strerror or e}") from None
    check_writable(folder)


@click.command("serve")
@model_options
@click.option("--host", default="127.0.0.1", help="Address to listen on; 0.0.0.0 for every network (set a key).")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, help="Port (0: any free one, printed).")
@click.option(
    "--lora-dir",
    envvar="SD35M_MLX_LORA_DIR",
    metavar="FOLDER",
    help="A folder of LoRA .safetensors files: prompts' <lora:NAME:WEIGHT> tags (and the OpenAI extension "
    "`loras`) load them by name, /sdapi/v1/loras lists them. Also SD35M_MLX_LORA_DIR.  [default: none; tags refused]",
)
@click.option(
    "--lora-cache-mb",
    type=click.IntRange(0),
    default=None,
    help="Megabytes of LoRA parameters kept loaded between requests (least recently used unloaded first; a "
    "request's own LoRAs always load).  [default: 1/16 of this machine's memory]",
)
@click.option(
    "--controlnet",
    "controlnets",
    multiple=True,
    metavar="PATH_OR_REPO",
    help="An SD3 ControlNet clients may use (diffusers folder, .safetensors file or Hub id, as generate's "
    "--controlnet); repeatable. Named by its folder or file stem (a Hub id by its last part) in /controlnet/model_list "
    "and A1111's alwayson_scripts.controlnet units. Hub ids download at start-up, with the model; each loads on first "
    "use, and the least recently used are unloaded past the LoRA cache's default budget.  [default: none]",
)
@click.option(
    "--api-key",
    envvar="SD35M_MLX_API_KEY",
    show_envvar=True,
    default=None,
    help="Require `Authorization: Bearer KEY` on every endpoint but /health.  [default: none]",
)
@click.option("--queue-size", type=click.IntRange(0, 1000), default=8, help="Jobs that may wait behind the "
              "running one; more get 503 with Retry-After.")  # fmt: skip
@click.option("--max-steps", type=click.IntRange(1), default=200, help="Most denoising steps one image may ask for.")
@click.option("--max-body-mb", type=click.IntRange(1), default=64, help="Largest request body (MB); larger: 413.")
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    envvar="SD35M_MLX_OUTPUT_DIR",
    show_envvar=True,
    default=None,
    help="Folder of saved images, kept across restarts: the web page's history lists it, A1111 save_images writes "
    f"NNNNN-SEED.png into it.  [default: {DEFAULT_OUTPUT_DIR}, made at the first save]",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="A host name the server answers to besides IP addresses, localhost and this machine's names "
    "(repeatable); other Host headers get 403, which stops DNS-rebinding pages.",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    metavar="URL",
    help="A web page origin (e.g. http://localhost:3000) allowed to call the API from a browser (repeatable); "
    "requests from other pages' origins get 403.",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(1, 3600),
    default=30.0,
    help="Seconds a request's headers and body may take to arrive; slower connections are closed.",
)
@click.option(
    "--signed-urls",
    is_flag=True,
    help='With --api-key: response_format="url" URLs carry an expiring signature (?exp=...&sig=...) and open '
    "without the key (a chat UI's <img src> shows them).  [default: off]",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def serve(
    host, port, lora_dir, lora_cache_mb, controlnets, api_key, queue_size, max_steps, max_body_mb, output_dir,
    allowed_hosts, cors_origins, read_timeout, signed_urls, verbose, **params,
) -> None:  # fmt: skip
    """Keep the model loaded and serve it over HTTP: OpenAI's Images API (/v1/images/generations,
    /v1/images/edits), AUTOMATIC1111's /sdapi/v1 (txt2img, img2img, progress, interrupt) and a web
    page at /. One job runs at a time; Ctrl-C or SIGTERM cancels it and stops.

    \b
    Examples:
      sd35m-mlx serve                                  # http://127.0.0.1:7860/
      sd35m-mlx serve --quantize 8 --t5-quantize 4 --port 8000
      SD35M_MLX_API_KEY=secret sd35m-mlx serve --host 0.0.0.0
    """
    try:
        from sd35m_mlx import server as server_pkg

        server_pkg.require_extra()
        from sd35m_mlx.server.app import ServerConfig
        from sd35m_mlx.server.controlnets import local_sources
        from sd35m_mlx.server.run import bind
        from sd35m_mlx.server.run import serve as run_server
        from sd35m_mlx.server.spec import Limits
    except ImportError as e:
        raise RunError(one_line(e)) from None
    if lora_dir is not None and not Path(lora_dir).expanduser().is_dir():
        raise UsageError(f"--lora-dir {lora_dir} is not a folder")
    controlnet_sources = controlnet_names(controlnets)
    if output_dir is not None:  # chosen: checked now; the default is made when the first image is saved
        check_output_dir(Path(output_dir).expanduser())
    output_dir = str(Path(output_dir or DEFAULT_OUTPUT_DIR).expanduser())

    if signed_urls and not api_key:
        raise UsageError("--signed-urls needs --api-key (without a key every URL opens as it is)")
    for origin in cors_origins:
        if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
            raise UsageError(
                f"--cors-origin {origin}: give an origin as scheme://host[:port], e.g. http://localhost:3000"
            )
    try:
        sock = bind(host, port)  # before loading: a taken port fails now, not after minutes of loading
    except OSError as e:  # the port is taken, the address is not ours, ...
        raise RunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    load_t5 = params["t5"]
    titles = [public_name(m) for m in params["model"]]
    if len(set(titles)) < len(titles):
        raise UsageError(f"--model: two models would have the same name ({', '.join(titles)}); rename a folder")
    folders = [model_io.resolve_model(m, revision=params["revision"], load_t5=load_t5) for m in params["model"]]
    dtype = params["dtype"] if params["dtype"] != "auto" else model_io.default_dtype()
    quantize = int(params["quantize"]) if params["quantize"] is not None else None
    load = functools.partial(model_io.load_pipeline, dtype=dtype, load_t5=load_t5, quantize=quantize,
                             t5_quantize=params["t5_quantize"], low_memory=params["low_memory"])  # fmt: skip
    click.echo(f"Loading {params['model'][0]} ({dtype}{'' if load_t5 else ', no T5'})", err=True)
    t0 = time.perf_counter()
    try:
        pipe = load(folders[0])
        controlnet_sources = local_sources(controlnet_sources)  # Hub ids downloaded now, not in the worker
    except Exception as e:
        raise RunError(one_line(e)) from None
    click.echo(f"Loaded in {time.perf_counter() - t0:.1f} s", err=True)

    config = ServerConfig(
        model_name=titles[0],
        loaders={title: functools.partial(load, folder) for title, folder in zip(titles, folders, strict=True)},
        api_key=api_key or None,
        max_queue=queue_size,
        max_body_bytes=max_body_mb << 20,
        limits=Limits(max_steps=max_steps),
        output_dir=output_dir,
        load_options={"quantize": quantize, "t5_quantize": params["t5_quantize"]},
        allowed_hosts=tuple(allowed_hosts),
        cors_origins=tuple(cors_origins),
        read_timeout=read_timeout,
        signed_urls=signed_urls,
        lora_dir=lora_dir,
        controlnets=controlnet_sources,
        lora_cache_bytes=lora_cache_mb << 20 if lora_cache_mb is not None else None,
    )
    run_server(pipe, host=host, port=port, config=config, verbose=verbose, sock=sock,
               say=lambda m: click.echo(m, err=True))  # fmt: skip
