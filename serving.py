"""Serving beside the UI: which model, loading and warming it, the shared captioning service, the HTTP routes.

    service = start_service(model, precision="auto", threads=None)   # threads set, model resolved, loaded, warmed up
    serve(service, demo, host, port)                          # demo at /, POST /predict, GET /health (create_app)

The model comes from --model, else $CAPTION_MODEL, else a local checkpoint (checkpoints/shapes/best, or the cache
folder on a Space), else the `shapes` preset is trained once (caption_model.training, not in a Space bundle).
app.py builds the Blocks UI over a CaptionService; nothing here knows its layout.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np
import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from starlette.concurrency import run_in_threadpool

from caption_model import Caption, ImageCaptioner
from caption_model.config import METRICS_FILE, TRAINING_CONFIG_FILE
from caption_model.cpu.fast_mode import FAST_MODES
from caption_model.cpu.features import describe_cpu
from caption_model.cpu.threads import set_inference_threads
from caption_model.generation import DEFAULT_NO_REPEAT_NGRAM_SIZE, DEFAULT_REPETITION_PENALTY
from caption_model.heatmap import DEFAULT_INPUT_SIZE, cell_geometry
from caption_model.hub.card import describe_training_data, read_json
from caption_model.processing import load_image

if TYPE_CHECKING:
    from mcp.server.fastmcp import FastMCP

# --precision: "auto" (= "int8"): the fast mode chosen for this CPU; or one forced (caption_model.cpu.fast_mode)
PRECISIONS = ("auto", "int8") + FAST_MODES

ROOT = Path(__file__).resolve().parent
LOCAL_CHECKPOINT = ROOT / "checkpoints" / "shapes" / "best"  # where `python train.py --preset shapes` puts its best
CACHE_CHECKPOINT = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "caption_model" / "shapes" / "best"
)  # used instead on a Space, where only temp/cache directories are written
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # largest upload accepted by the UI, /predict and the MCP tool
DISPLAY_MAX_SIDE = 768  # overlays are drawn on a copy this size at most (a 50 MP photo stays fast)
# words whose heatmap is never shown first (UI) or returned by default (MCP): the first other word is
STOP_WORDS = frozenset("a an the of to and in on at with is are it its there this that left right above below "
                       "two three single image shapes plain background".split())
MCP_MOUNT_PATH = "/gradio_api/mcp"  # where Gradio's own MCP server was: client configurations keep working
SHUTDOWN_TIMEOUT_S = 3  # at SIGTERM, open connections (a browser's event stream) get this long to finish


class ModelLoadError(RuntimeError):
    """The configured model could not be found or loaded (message says where we looked)."""


# --------------------------------------------------------------------------------------------------------------------
# Which model, and loading it
# --------------------------------------------------------------------------------------------------------------------


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_path(model: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else is meant as a folder."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model)


def train_shapes_checkpoint(output_dir: Path) -> Path:
    """Train the `shapes` preset once (caption_model.training.train_preset); returns its best checkpoint folder."""
    try:
        training = importlib.import_module("caption_model.training")  # lazy: a Space bundle ships without it
    except ImportError as error:
        raise ModelLoadError(
            "no model configured (--model / $CAPTION_MODEL) and no local checkpoint at "
            f"{LOCAL_CHECKPOINT}; training the shapes preset needs caption_model.training, which cannot be "
            f"imported here ({error}). Pass --model HUB_ID_OR_DIR, or train one first."
        ) from error
    plan = getattr(training, "preset_plan", lambda preset: f"the {preset!r} preset")("shapes")
    print(
        f"No model to serve: none given (--model, $CAPTION_MODEL) and no checkpoint at {output_dir / 'best'}.\n"
        f"Training the small 'shapes' demo model on this machine first, once: {plan}, a wait of some minutes on a "
        "CPU. How long on this machine is printed after the first steps, and the progress bar shows the time left. "
        f"The model is saved to {output_dir / 'best'} and reused on every later start; the app serves when "
        "training ends.",
        file=sys.stderr,
        flush=True,
    )
    best = Path(training.train_preset("shapes", output_dir=output_dir))
    if not (best / "config.json").is_file():
        raise ModelLoadError(f"train_preset('shapes') finished but {best} holds no checkpoint (config.json)")
    return best


def resolve_model(model: str | None) -> str:
    """--model, else $CAPTION_MODEL, else a local shapes checkpoint, else train the shapes preset once."""
    if model:
        return model
    if os.environ.get("CAPTION_MODEL"):
        return os.environ["CAPTION_MODEL"]
    for candidate in (LOCAL_CHECKPOINT, CACHE_CHECKPOINT):
        if (candidate / "config.json").is_file():
            return str(candidate)
    target = CACHE_CHECKPOINT if os.environ.get("SPACE_ID") else LOCAL_CHECKPOINT
    return str(train_shapes_checkpoint(target.parent))


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda when there is a GPU, else mps (Apple silicon), else cpu; ModelLoadError for one that is absent."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device not in available:
        raise ModelLoadError(f"--device must be auto, cpu, cuda or mps, got {device!r}")
    if not available[device]:
        raise ModelLoadError(f"--device {device}: no such device on this machine (torch sees none); use cpu or auto")
    return torch.device(device)


def load_captioner(model: str, precision: str = "auto", device: str = "cpu",
                   revision: str | None = None) -> ImageCaptioner:
    """Load `model` (a checkpoint folder, or a Hub repo id at `revision`: a branch, tag or commit; default main) in
    eval mode on `device` ("auto": a GPU if there is one). On the CPU in the fast mode chosen for this CPU
    (precision "auto" or "int8"; or forced: "int8-vnni", "int8-avx2"; "fp32": the weights as trained); on a GPU in
    half precision (CaptionService captions under autocast; the int8 modes are CPU-only). ModelLoadError says why
    not."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    target = resolve_device(device)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder but not a checkpoint: expected config.json, model.safetensors and the "
                "tokenizer files written by ImageCaptioner.save_pretrained"
            )
        source = str(path)
    elif _looks_like_path(model):
        raise ModelLoadError(f"model folder {model!r} does not exist")
    else:
        source = model
    if revision and path.is_dir():
        raise ModelLoadError(f"a revision ({revision!r}) applies to a Hub repo id, not to the folder {model!r}")
    try:
        captioner = ImageCaptioner.from_pretrained(source, revision=revision or None)
    except Exception as error:  # hub, IO and key errors all mean "cannot serve this model"
        where = (
            "HF_HUB_OFFLINE is set, so only the local Hub cache was searched; download it first or unset it"
            if _is_offline()
            else "expected a local checkpoint folder or a Hub model repo id (set HF_TOKEN for a private repo)"
        )
        at = f" at revision {revision!r}" if revision else ""
        raise ModelLoadError(f"could not load model {model!r}{at}: {type(error).__name__}: {error}. {where}") from error
    captioner.eval()
    if target.type != "cpu":
        captioner.to(target)
    else:  # the fast mode this CPU gets (caption_model.cpu.fast_mode); fp32 where asked or where int8 cannot run
        captioner.quantize_int8(mode="auto" if precision == "int8" else precision)
    return captioner


def warm_up(captioner: ImageCaptioner) -> None:
    """Caption a blank image greedily and with beams once, so that the first user does not pay for what a fresh
    process does once (oneDNN picks its convolution kernels, fbgemm its int8 paths)."""
    blank = Image.new("RGB", (captioner.config.image_size,) * 2, "white")
    with half_precision_on_gpu(captioner):
        for num_beams in (1, 3):
            captioner.caption(blank, num_beams=num_beams, max_length=3)


def half_precision_on_gpu(captioner: ImageCaptioner) -> contextlib.AbstractContextManager:
    """fp16 autocast where the model is on a GPU (cuda, mps); nothing on the CPU."""
    device = captioner.device.type
    return torch.autocast(device, dtype=torch.float16) if device != "cpu" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------------
# The shared service and its JSON
# --------------------------------------------------------------------------------------------------------------------


class CaptionService:
    """The loaded model shared by the UI and the HTTP routes: one forward at a time."""

    def __init__(self, captioner: ImageCaptioner, model_id: str, revision: str | None = None) -> None:
        self.captioner = captioner
        self.model_id = model_id
        self.revision = revision  # of a Hub model; None: main (or a folder)
        self.training_data = training_data_of(model_id)  # e.g. "synthetic shapes", "Flickr8k"
        self._lock = threading.Lock()

    @property
    def precision(self) -> str:
        """"int8" (int8 decoder), "fp16" (autocast on a GPU) or "fp32" (the weights as trained)."""
        if self.captioner.quantized:
            return "int8"
        return "fp16" if self.captioner.device.type != "cpu" else "fp32"

    @functools.cached_property
    def fast_mode(self) -> dict[str, str]:
        """The CPU mode served and why: {"mode": "int8-vnni" | "int8-avx2" | "fp32" | "fp16 (GPU)", "reason", "cpu"};
        fixed once the model is loaded, so /health does not read /proc/cpuinfo per request."""
        if self.captioner.device.type != "cpu":
            return {"mode": "fp16 (GPU)", "reason": f"autocast on {self.captioner.device}", "cpu": describe_cpu()}
        reason = self.captioner.fast_mode_reason or "asked for: the weights as trained"
        return {"mode": self.captioner.fast_mode or "fp32", "reason": reason, "cpu": describe_cpu()}

    @torch.inference_mode()
    def caption(
        self, image: Any, num_beams: int = 1, max_length: int = 30, length_penalty: float = 1.0,
        no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM_SIZE, repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
        display_side: int | None = None,
    ) -> tuple[Image.Image, Caption]:
        """Load `image` (path, bytes, PIL) and caption it; ValueError (from load_image) for a bad file. The image
        is decoded only as large as needed (a JPEG at reduced scale): the model's input side, or with
        `display_side` a copy at most that large for display, which the model then reads.
        `processing.original_size(picture)` is the file's own size."""
        picture = load_image(image, min_side=self.captioner.config.image_size, display_side=display_side)
        if display_side:
            picture.thumbnail((display_side, display_side), Image.Resampling.BICUBIC)  # in place, keeps .info
        with self._lock, half_precision_on_gpu(self.captioner):
            result = self.captioner.caption(
                picture, num_beams=int(num_beams), max_length=int(max_length), length_penalty=float(length_penalty),
                no_repeat_ngram_size=int(no_repeat_ngram_size), repetition_penalty=float(repetition_penalty),
            )
        return picture, result


def training_data_of(model_id: str) -> str:
    """What the model was trained on, as its checkpoint records it (training_config.json, metrics.json in the
    folder or the local Hub cache): "synthetic shapes", "Flickr8k", "local imagefolder, 1234 images", ..."""
    folder = Path(model_id).expanduser()

    def record(name: str) -> dict:
        try:
            path = folder / name if folder.is_dir() else try_to_load_from_cache(model_id, name)
            return read_json(Path(path)) if isinstance(path, (str, Path)) else {}
        except (OSError, ValueError):  # not a Hub id, not in the cache, not valid JSON: nothing recorded
            return {}

    return describe_training_data(record(TRAINING_CONFIG_FILE), record(METRICS_FILE)).name


def start_service(model: str | None, precision: str = "auto", threads: int | None = None,
                  device: str = "cpu", revision: str | None = None) -> CaptionService:
    """Set torch's CPU threads (`threads`, else the CPUs this process may use), resolve and load the model (at
    `revision`, for a Hub id) on `device`, warm it up; ModelLoadError if there is no model to serve."""
    set_inference_threads(threads)
    model_id = resolve_model(model)
    captioner = load_captioner(model_id, precision=precision, device=device, revision=revision)
    warm_up(captioner)
    return CaptionService(captioner, model_id, revision)


def first_content_word(words: list[str]) -> int | None:
    """The index of the word whose heatmap says most: the first that is not a STOP_WORDS word (None: no words)."""
    if not words:
        return None
    return next((i for i, word in enumerate(words) if word not in STOP_WORDS), 0)


def word_maps(result: Caption, grid: tuple[int, int]) -> np.ndarray:
    """The caption's attention as float32 (len(words), gh, gw), also when the caption is empty."""
    return np.asarray(result.attention, dtype=np.float32).reshape(len(result.words), *grid)


def caption_payload(result: Caption, grid: tuple[int, int], image_size: tuple[int, int], model_id: str,
                    input_size: int = DEFAULT_INPUT_SIZE) -> dict:
    """JSON of the `/caption` API: caption, words, score, grid and image size, one attention map per word, and
    where each cell sits in the image (`input_size`: the model's input side S; heatmap.cell_geometry)."""
    attention = word_maps(result, grid)  # (len(words), gh, gw)
    return {
        "caption": result.text,  # str: the words joined by spaces
        "words": list(result.words),  # [len(words)] whole words
        "score": float(result.score),  # mean log-probability of the caption, <= 0
        "grid_size": [int(grid[0]), int(grid[1])],  # [gh, gw]
        "image_size": [int(image_size[0]), int(image_size[1])],  # [width, height] of the (EXIF-upright) input
        "attention": np.round(attention, 6).tolist(),  # [word][row][col] = (len(words), gh, gw), each map sums to 1
        "model": model_id,  # str: the Hub id or folder served
        # cell (i, j)'s receptive-field centre in image pixels: (cell_centres_x[j], cell_centres_y[i])
        "cell_geometry": cell_geometry(grid, image_size, input_size),
    }


# --------------------------------------------------------------------------------------------------------------------
# HTTP: the Blocks at / plus /predict and /health
# --------------------------------------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, service: CaptionService) -> None:
    """POST /predict (multipart field `image`) and GET /health; 4xx answers are JSON {"error": "..."}."""

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())[1:]))}: {e.get('msg')}" for e in error.errors())
        return JSONResponse(
            {"error": "expected a multipart/form-data upload with a file field named 'image' (optional fields "
                      "no_repeat_ngram_size 0-10, repetition_penalty 1.0-3.0)" + (f"; got {problems}" if problems else "")},
            status_code=422,
        )

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness plus the model being served, its precision, the fast mode chosen for this CPU and why, and
        torch's CPU threads."""
        return {"status": "ok", "model": service.model_id, "revision": service.revision or "main",
                "precision": service.precision,
                "fast_mode": service.fast_mode, "threads": torch.get_num_threads()}

    @app.post("/predict")
    async def predict(image: UploadFile | None = File(None),
                      no_repeat_ngram_size: int = Form(DEFAULT_NO_REPEAT_NGRAM_SIZE, ge=0, le=10),
                      repetition_penalty: float = Form(DEFAULT_REPETITION_PENALTY, ge=1.0, le=3.0)) -> JSONResponse:
        """Caption one image greedily: {"caption": str, "words": [str], "score": float, "model": str}.
        Optional form fields: no_repeat_ngram_size (0 = off), repetition_penalty (1.0 = off)."""
        if image is None:
            return JSONResponse({"error": "missing the multipart file field 'image'"}, status_code=400)
        data = await image.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return JSONResponse(
                {"error": f"file too large: more than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB"}, status_code=413
            )
        if not data:
            return JSONResponse({"error": "expected an image file, got an empty upload"}, status_code=400)
        try:  # file contents only: /predict never takes a name or a path
            _, result = await run_in_threadpool(service.caption, data, 1, 30, 1.0, no_repeat_ngram_size,
                                                repetition_penalty)
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse({"caption": result.text, "words": list(result.words), "score": float(result.score),
                             "model": service.model_id})


def create_app(service: CaptionService, demo: gr.Blocks, mcp: FastMCP | None = None) -> FastAPI:
    """One FastAPI app, one model: `demo` (a Blocks built over `service`) at /, POST /predict, GET /health and,
    given one, the `mcp` server (mcp_server.py) at its MOUNT_PATH, /gradio_api/mcp/."""
    lifespan = None
    if mcp is not None:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI):
            async with mcp.session_manager.run():  # the MCP transport's task group, for the app's lifetime
                yield

    app = FastAPI(title="Image captioner", docs_url=None, redoc_url=None, lifespan=lifespan)
    _add_routes(app, service)
    if mcp is not None:
        app.mount(MCP_MOUNT_PATH, mcp.streamable_http_app())  # before the Blocks at "/", which would take the path
    app = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        footer_links=["api", "settings"],
        run_history=False,
        max_file_size=MAX_UPLOAD_BYTES,
        ssr_mode=False,
        show_error=False,  # gr.Error messages (ours) are shown; other exceptions' text (paths...) is not
        mcp_server=False,  # ours (mcp_server.py) answers JSON, typed parameters and images at /gradio_api/mcp/
        theme=gr.themes.Default(primary_hue="orange"),
    )
    # Gradio refuses input paths it did not receive or cache only once the Blocks "has launched", which
    # mount_gradio_app never records: without this a client could name any file on the server.
    demo.has_launched = True
    return app


def serve(service: CaptionService, demo: gr.Blocks, host: str, port: int, mcp: FastMCP | None = None) -> None:
    """Serve create_app(service, demo, mcp) with uvicorn until interrupted (SIGTERM or Ctrl-C)."""
    import uvicorn

    print(
        f"Serving {service.model_id} ({service.precision}, {torch.get_num_threads()} CPU threads) "
        f"on http://{host}:{port}" + (f", MCP at http://{host}:{port}{MCP_MOUNT_PATH}/" if mcp else ""),
        flush=True,
    )
    uvicorn.run(create_app(service, demo, mcp), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S)
