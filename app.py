"""Gradio Space: caption an image and show where the model looked for every word.

    python app.py [--model HUB_ID_OR_DIR] [--host HOST] [--port PORT] [--precision {int8,fp32}] [--threads N]

The model comes from --model, else $CAPTION_MODEL, else a local checkpoint (checkpoints/shapes/best), else the
`shapes` preset is trained once through train.py. One process serves the UI at /, the gradio_client endpoint
/caption, and plain HTTP: POST /predict (multipart field `image`) and GET /health.

The model serves in the fast CPU mode by default (`--precision int8`, or $CAPTION_PRECISION): the int8 decoder;
captions match fp32 for >= 95% of images (benchmarks/int8_quality.py).
`--precision fp32` serves the weights exactly as trained. torch gets as many CPU threads as the process may use
(affinity capped by the container's CPU quota), or `--threads N` / $CAPTION_THREADS.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gradio as gr
import numpy as np
import torch
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from gradio_client.utils import decode_base64_to_binary
from PIL import Image
from starlette.concurrency import run_in_threadpool

from caption_model import Caption, ImageCaptioner
from caption_model.heatmap import overlay
from caption_model.processing import load_image
from caption_model.threads import set_inference_threads

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "examples"
LOCAL_CHECKPOINT = ROOT / "checkpoints" / "shapes" / "best"  # where `python train.py --preset shapes` puts its best
CACHE_CHECKPOINT = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "caption_model" / "shapes" / "best"
)  # used instead on a Space, where only temp/cache directories are written

MODEL_CONCURRENCY = 1  # one forward at a time: torch already uses both vCPUs of a free Space
QUEUE_MAX_SIZE = 64  # waiting requests beyond this get "queue full" instead of piling up
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # largest upload accepted by the UI and by /predict
DISPLAY_MAX_SIDE = 768  # overlays are drawn on a copy this size at most (a 50 MP photo stays fast)
STOP_WORDS = frozenset("a an the of to and in on at with is are left right above below".split())


class ModelLoadError(RuntimeError):
    """The configured model could not be found or loaded (message says where we looked)."""


# --------------------------------------------------------------------------------------------------------------------
# Model: resolution, loading, one shared lock
# --------------------------------------------------------------------------------------------------------------------


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_path(model: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else is meant as a folder."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model)


def train_shapes_checkpoint(output_dir: Path) -> Path:
    """Train the `shapes` preset once through train.py (`train_preset`) and return its best checkpoint folder."""
    try:
        from train import train_preset  # lazy: train.py is optional for serving a published model
    except ModuleNotFoundError as error:
        if error.name != "train":
            raise
        raise ModelLoadError(
            "no model configured (--model / $CAPTION_MODEL) and no local checkpoint at "
            f"{LOCAL_CHECKPOINT}; training the shapes preset needs train.py with train_preset(), which is not "
            "there. Pass --model HUB_ID_OR_DIR, or train one first."
        ) from error
    except ImportError as error:
        raise ModelLoadError(f"train.py exists but has no usable train_preset(): {error}") from error
    print(
        f"No model configured and no local checkpoint: training the shapes preset once into {output_dir} "
        "(progress below; minutes to tens of minutes on a 2-core CPU) ...",
        file=sys.stderr,
        flush=True,
    )
    result = train_preset("shapes", output_dir=output_dir)
    best = Path(result) if result is not None else output_dir / "best"
    if not (best / "config.json").is_file():
        raise ModelLoadError(f"train_preset('shapes') finished but {best} holds no checkpoint (config.json)")
    return best


def resolve_model(model: str | None) -> str:
    """--model, else $CAPTION_MODEL, else a local shapes checkpoint, else train the shapes preset once."""
    if model:
        return model
    if os.environ.get("CAPTION_MODEL"):
        return os.environ["CAPTION_MODEL"]
    on_space = bool(os.environ.get("SPACE_ID"))
    for candidate in (LOCAL_CHECKPOINT, CACHE_CHECKPOINT):
        if (candidate / "config.json").is_file():
            return str(candidate)
    target = CACHE_CHECKPOINT if on_space else LOCAL_CHECKPOINT
    return str(train_shapes_checkpoint(target.parent))


def load_captioner(model: str, int8: bool = True) -> ImageCaptioner:
    """Load `model` (a checkpoint folder or a Hub repo id) once, in eval mode, in the fast CPU mode unless
    `int8=False` (ImageCaptioner.quantize_int8); ModelLoadError says why not."""
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
    try:
        captioner = ImageCaptioner.from_pretrained(source)
    except Exception as error:  # hub, IO and key errors all mean "cannot serve this model"
        where = (
            "HF_HUB_OFFLINE is set, so only the local Hub cache was searched; download it first or unset it"
            if _is_offline()
            else "expected a local checkpoint folder or a Hub model repo id (set HF_TOKEN for a private repo)"
        )
        raise ModelLoadError(f"could not load model {model!r}: {type(error).__name__}: {error}. {where}") from error
    captioner.eval()
    if int8:
        captioner.quantize_int8()  # int8 decoder: faster on CPU, same API
    return captioner


def warm_up(captioner: ImageCaptioner) -> None:
    """Caption a blank image greedily and with beams once, so that the first user does not wait for what a fresh
    process does once (oneDNN picks its convolution kernels, fbgemm its int8 paths): full model, beam 3,
    the first caption takes ~400 ms instead of ~280 ms."""
    blank = Image.new("RGB", (captioner.config.image_size,) * 2, "white")
    for num_beams in (1, 3):
        captioner.caption(blank, num_beams=num_beams, max_length=3)


class CaptionService:
    """The loaded model shared by the UI and the HTTP routes: one forward at a time."""

    def __init__(self, captioner: ImageCaptioner, model_id: str) -> None:
        self.captioner = captioner
        self.model_id = model_id
        self._lock = threading.Lock()

    @torch.inference_mode()
    def caption(
        self, image: Any, num_beams: int = 1, max_length: int = 30, length_penalty: float = 1.0
    ) -> tuple[Image.Image, Caption]:
        """Load `image` (path, bytes, PIL) and caption it; ValueError (from load_image) for a bad file."""
        picture = load_image(image)
        with self._lock:
            result = self.captioner.caption(
                picture, num_beams=int(num_beams), max_length=int(max_length), length_penalty=float(length_penalty)
            )
        return picture, result


def word_maps(result: Caption, grid: tuple[int, int]) -> np.ndarray:
    """The caption's attention as float32 (len(words), gh, gw), also when the caption is empty."""
    return np.asarray(result.attention, dtype=np.float32).reshape(len(result.words), *grid)


def caption_payload(result: Caption, grid: tuple[int, int], image_size: tuple[int, int], model_id: str) -> dict:
    """JSON for programs: caption, words, score, grid size and one attention map per word (nested lists)."""
    attention = word_maps(result, grid)  # (len(words), gh, gw)
    return {
        "caption": result.text,
        "words": list(result.words),
        "score": float(result.score),
        "grid_size": [int(grid[0]), int(grid[1])],
        "image_size": [int(image_size[0]), int(image_size[1])],  # width, height of the (EXIF-upright) input
        "attention": np.round(attention, 6).tolist(),  # [word][row][col], each map sums to 1
        "model": model_id,
    }


# --------------------------------------------------------------------------------------------------------------------
# UI
# --------------------------------------------------------------------------------------------------------------------


def uploaded_file(payload: dict[str, Any] | str | None) -> tuple[str | bytes | None, str]:
    """The image input's raw payload (the event runs with preprocess=False) -> (what load_image reads, a name
    to show the user). Gradio has already vetted the payload: a `path` is a file it received or cached for this
    app (anything else was refused before this runs), a data URL arrives as `url`. Decoding is left to our own
    loader, so a refused upload is explained ("not an image", "truncated", ...)."""
    if payload is None or payload == "":
        return None, ""
    if isinstance(payload, str):  # a path handed over by gr.Examples
        return payload, Path(payload).name
    url, path = payload.get("url") or "", payload.get("path")
    if url.startswith("data:") and not path:
        data, _ = decode_base64_to_binary(url)
        return data, "the pasted image"
    return path, payload.get("orig_name") or Path(str(path)).name


@dataclass
class Result:
    """What one captioning run leaves in gr.State: re-rendering a word or the opacity needs no model call."""

    image: Image.Image  # display copy, at most DISPLAY_MAX_SIDE
    words: list[str]
    attention: np.ndarray  # (len(words), gh, gw)


def _default_word(words: list[str]) -> int | None:
    if not words:
        return None
    return next((i for i, w in enumerate(words) if w not in STOP_WORDS), 0)


class CaptionUI:
    """The Blocks event handlers (typed, no Gradio layout): usable and testable without a browser."""

    def __init__(self, service: CaptionService) -> None:
        self.service = service

    def caption(
        self,
        image: dict[str, Any] | str | None,
        decoding: Literal["greedy", "beam"] = "beam",
        num_beams: int = 3,
        max_length: int = 30,
        length_penalty: float = 1.0,
    ) -> tuple[str, dict[str, Any], Result]:
        """Caption an uploaded image: (caption text, JSON with words and heatmaps, state for the views)."""
        source, name = uploaded_file(image)
        if source is None:
            raise gr.Error("No image yet: upload one, paste it from the clipboard, use the webcam or pick an example.")
        beams = 1 if decoding == "greedy" else max(1, min(5, int(num_beams)))
        try:
            picture, result = self.service.caption(source, beams, max_length, length_penalty)
        except ValueError as error:
            message = str(error)
            if isinstance(source, str):
                message = message.replace(repr(source), repr(name)).replace(source, name)  # not the temp path
            raise gr.Error(f"That file can't be captioned: {message}", print_exception=False) from error
        if not result.words:
            gr.Warning("The model wrote no words for this image (try beam search or another image).")
        display = picture.copy()
        display.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
        grid = tuple(self.service.captioner.grid_size)
        state = Result(image=display, words=list(result.words), attention=word_maps(result, grid))
        return result.text, caption_payload(result, grid, picture.size, self.service.model_id), state

    def overlay_for(self, state: Result | None, index: int | None, opacity: float) -> Image.Image | None:
        """The heatmap of word `index` over the image (None when there is nothing to show)."""
        if state is None or index is None or not 0 <= int(index) < len(state.words):
            return None
        return overlay(state.image, state.attention[int(index)], alpha=float(opacity))

    def show_result(self, state: Result | None, opacity: float) -> tuple[Any, Any, list[tuple[Image.Image, str]]]:
        """After a run: the word picker, the default word's overlay and the gallery of every word."""
        if state is None:
            return gr.Radio(choices=[], value=None), None, []
        index = _default_word(state.words)
        picker = gr.Radio(choices=[(w, i) for i, w in enumerate(state.words)], value=index)
        return picker, self.show_word(state, index, opacity), self.gallery(state, opacity)

    def show_word(self, state: Result | None, index: int | None, opacity: float) -> Any:
        """Overlay of the chosen word, labelled with it."""
        image = self.overlay_for(state, index, opacity)
        label = f'Where the model looked for "{state.words[int(index)]}"' if image is not None else "Heatmap"
        return gr.Image(value=image, label=label)

    def gallery(self, state: Result | None, opacity: float) -> list[tuple[Image.Image, str]]:
        """Every word's overlay, captioned "n. word"."""
        if state is None:
            return []
        return [(self.overlay_for(state, i, opacity), f"{i + 1}. {w}") for i, w in enumerate(state.words)]

    def restyle(self, state: Result | None, index: int | None, opacity: float) -> tuple[Any, list]:
        """Opacity changed: redraw the overlay and the gallery from the stored result."""
        return self.show_word(state, index, opacity), self.gallery(state, opacity)

    def pick_from_gallery(self, state: Result | None, opacity: float, event: gr.SelectData) -> tuple[Any, Any]:
        """A gallery tile was clicked: select that word."""
        index = int(event.index)
        return gr.Radio(value=index), self.show_word(state, index, opacity)


def _examples() -> list[list[str]]:
    files = sorted(EXAMPLES_DIR.glob("shapes_*.png")) + sorted(EXAMPLES_DIR.glob("*.jpg"))
    return [[str(p)] for p in files]


def create_demo(captioner: ImageCaptioner, model_id: str = "unnamed model") -> gr.Blocks:
    """The Blocks UI around a loaded captioner; its captioning event is the `/caption` API endpoint."""
    service = captioner if isinstance(captioner, CaptionService) else CaptionService(captioner, model_id)
    ui = CaptionUI(service)
    grid = getattr(service.captioner, "grid_size", None)
    with gr.Blocks(title="Image captioning with a heatmap per word", analytics_enabled=False) as demo:
        gr.Markdown(
            "# Image captioning with a heatmap per word\n"
            "Upload an image (or paste it, or use the webcam), press **Caption**, then pick a word to see where the "
            "model looked when it wrote it."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    label="Image",
                    sources=["upload", "clipboard", "webcam"],
                    height=360,
                    elem_id="input-image",
                )
                with gr.Row():
                    decoding = gr.Radio(
                        [("Greedy", "greedy"), ("Beam search", "beam")], value="beam", label="Decoding"
                    )
                    num_beams = gr.Slider(1, 5, value=3, step=1, label="Beam size")
                with gr.Accordion("Advanced", open=False):
                    max_length = gr.Slider(2, 60, value=30, step=1, label="Max length (tokens)")
                    length_penalty = gr.Slider(
                        0.0, 2.0, value=1.0, step=0.1, label="Length penalty (beam search; > 1 favours longer)"
                    )
                run = gr.Button("Caption", variant="primary", elem_id="run-button")
                gr.Examples(
                    _examples(),
                    inputs=[image],
                    label="Examples (synthetic shapes; two CC BY 2.0 photos, see examples/ATTRIBUTION.md)",
                )
            with gr.Column(scale=1):
                caption = gr.Textbox(label="Caption", interactive=False, buttons=["copy"], elem_id="caption")
                words = gr.Radio(choices=[], label="Pick a word", type="value", elem_id="word-picker")
                heatmap = gr.Image(
                    label="Heatmap",
                    type="pil",
                    format="png",
                    interactive=False,
                    buttons=["download", "fullscreen"],
                    height=360,
                    elem_id="overlay",
                )
                opacity = gr.Slider(0.1, 0.9, value=0.5, step=0.05, label="Heatmap opacity")
        gallery = gr.Gallery(
            label="Every word's heatmap", columns=6, height="auto", object_fit="contain", elem_id="gallery"
        )
        with gr.Accordion("Heatmap data (JSON, as returned by the /caption API)", open=False):
            data = gr.JSON(label="Caption data")
        state = gr.State(None, time_to_live=1800)
        gr.Markdown(
            f"Model: `{service.model_id}`"
            + (" (int8 decoder)" if service.captioner.quantized else " (fp32)")
            + (f" · attention grid {grid[0]}×{grid[1]}" if grid else "")
            + " · API: `/caption` (gradio_client), `POST /predict`, `GET /health`",
            elem_id="footer-model",
        )

        decoding.change(
            lambda d: gr.Slider(interactive=d == "beam"), decoding, num_beams, api_visibility="private", queue=False
        )
        run.click(
            ui.caption,
            inputs=[image, decoding, num_beams, max_length, length_penalty],
            outputs=[caption, data, state],
            api_name="caption",
            concurrency_id="model",
            concurrency_limit=MODEL_CONCURRENCY,
            preprocess=False,
        ).success(ui.show_result, inputs=[state, opacity], outputs=[words, heatmap, gallery], api_visibility="private")
        words.input(ui.show_word, inputs=[state, words, opacity], outputs=heatmap, api_visibility="private")
        opacity.release(
            ui.restyle, inputs=[state, words, opacity], outputs=[heatmap, gallery], api_visibility="private"
        )
        gallery.select(
            ui.pick_from_gallery, inputs=[state, opacity], outputs=[words, heatmap], api_visibility="private"
        )
    demo.queue(default_concurrency_limit=MODEL_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    demo.caption_service = service  # type: ignore[attr-defined]  # used by create_app's HTTP routes
    return demo


# --------------------------------------------------------------------------------------------------------------------
# HTTP app: the Blocks at / plus /predict and /health
# --------------------------------------------------------------------------------------------------------------------


def create_app(captioner: ImageCaptioner, model_id: str = "unnamed model") -> FastAPI:
    """FastAPI app serving the UI at /, POST /predict and GET /health from one process (and one model)."""
    demo = create_demo(captioner, model_id)
    service: CaptionService = demo.caption_service  # type: ignore[attr-defined]
    app = FastAPI(title="Image captioner", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"error": "expected a multipart/form-data upload with a file field named 'image'"}, status_code=422
        )

    @app.get("/health")
    def health() -> dict[str, str | int]:
        """Liveness plus the model being served, its precision and torch's CPU threads."""
        return {"status": "ok", "model": service.model_id,
                "precision": "int8" if service.captioner.quantized else "fp32", "threads": torch.get_num_threads()}

    @app.post("/predict")
    async def predict(image: UploadFile | None = File(None)) -> JSONResponse:
        """Caption one image (multipart field `image`): {"caption", "words", "score", "model"}; 4xx JSON if bad."""
        if image is None:
            return JSONResponse({"error": "missing the multipart file field 'image'"}, status_code=400)
        data = await image.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return JSONResponse(
                {"error": f"file too large: more than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB"}, status_code=413
            )
        if not data:
            return JSONResponse({"error": "expected an image file, got an empty upload"}, status_code=400)
        try:
            _, result = await run_in_threadpool(service.caption, data, 1)
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse(
            {"caption": result.text, "words": list(result.words), "score": float(result.score), "model": service.model_id}
        )

    app = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        footer_links=["api", "settings"],
        run_history=False,
        max_file_size=MAX_UPLOAD_BYTES,
        ssr_mode=False,
        show_error=False,  # gr.Error messages (ours) are shown; other exceptions' text (paths...) is not
        theme=gr.themes.Default(primary_hue="orange"),
    )
    # Gradio refuses input paths it did not receive or cache only once the Blocks "has launched", which
    # mount_gradio_app never records: without this a client could name any file on the server.
    demo.has_launched = True
    return app


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        sys.exit(f"app.py: ${name} must be a whole number of threads, got {value!r}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load the model once, serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hub repo id or checkpoint folder (default: $CAPTION_MODEL, then a local one)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--precision", choices=["int8", "fp32"], default=os.environ.get("CAPTION_PRECISION", "int8"),
                        help="int8 (default, $CAPTION_PRECISION): the int8 decoder, the fast CPU mode; "
                             "fp32: the weights exactly as trained")
    parser.add_argument("--threads", type=int, default=_int_env("CAPTION_THREADS"),
                        help="CPU threads for inference (default $CAPTION_THREADS, else the CPUs this process may "
                             "use: its affinity capped by the container's CPU quota, not the host's core count)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    threads = set_inference_threads(args.threads)
    try:
        model_id = resolve_model(args.model)
        captioner = load_captioner(model_id, int8=args.precision == "int8")
    except ModelLoadError as error:
        sys.exit(f"app.py: {error}")
    warm_up(captioner)

    import uvicorn

    print(f"Serving {model_id} ({args.precision}, {threads} CPU threads) on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(captioner, model_id), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
