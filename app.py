"""Gradio Space: caption an image and show where the model looked for every word.

    python app.py [--model HUB_ID_OR_DIR] [--host HOST] [--port PORT] [--precision MODE] [--threads N]

This file is the UI: constants, the typed event handlers (CaptionUI) and the Blocks layout. serving.py finds and
loads the model (--model, else $CAPTION_MODEL, else a local checkpoint, else the `shapes` preset trained once) and
serves, from one process, this UI at /, its gradio_client endpoint /caption, POST /predict and GET /health.

The model serves in the fast CPU mode chosen for this CPU by default (`--precision auto`, or $CAPTION_PRECISION):
int8-vnni where the CPU has AVX512-VNNI, int8-avx2 on other x86-64 CPUs, fp32 where torch has no int8 engine (ARM);
captions match fp32 for >= 98% of images (benchmarks/int8_quality.py). /health and the footer say which mode runs
and why; `--precision int8-vnni|int8-avx2` forces one, `--precision fp32` serves the weights exactly as trained. torch gets as many CPU threads as the process may use
(affinity capped by the container's CPU quota), or `--threads N` / $CAPTION_THREADS.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gradio as gr
import numpy as np
from gradio_client.utils import decode_base64_to_binary
from PIL import Image

import mcp_server
import serving
from caption_model.generation import (DEFAULT_NO_REPEAT_NGRAM_SIZE, DEFAULT_REPETITION_PENALTY,
                                     check_decoding_arguments, longest_caption)
from caption_model.heatmap import legend_colours, overlay
from caption_model.processing import load_image, original_size

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MODEL_CONCURRENCY = 1  # one forward at a time: torch already uses both vCPUs of a free Space
QUEUE_MAX_SIZE = 64  # waiting requests beyond this get "queue full" instead of piling up
DISPLAY_CACHE_SIZE = 8  # display copies kept between a caption and its views (one per concurrent upload)
DISPLAY_MAX_SIDE = serving.DISPLAY_MAX_SIDE  # overlays are drawn on a copy this size at most
STOP_WORDS = serving.STOP_WORDS  # words never shown first: the first other word is selected after a caption


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
    input_size: int  # the model's input side S: where each cell sits in the image (heatmap.cell_centres)


def _default_word(words: list[str]) -> int | None:
    return serving.first_content_word(words)


class CaptionUI:
    """The Blocks event handlers (typed, no Gradio layout): usable and testable without a browser."""

    def __init__(self, service: serving.CaptionService) -> None:
        self.service = service
        # display copies of the latest uploads (cached path -> image), so the views' step does not decode the
        # upload a second time; a few entries: concurrent sessions, not a history
        self._displays: OrderedDict[str, Image.Image] = OrderedDict()
        self._displays_lock = threading.Lock()

    def _remember_display(self, source: str | bytes, picture: Image.Image) -> None:
        if isinstance(source, str):
            display = picture.copy()
            display.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
            with self._displays_lock:
                self._displays[source] = display
                while len(self._displays) > DISPLAY_CACHE_SIZE:
                    self._displays.popitem(last=False)

    def _display_of(self, source: str | bytes) -> Image.Image:
        with self._displays_lock:
            display = self._displays.pop(source, None) if isinstance(source, str) else None
        if display is None:  # a data URL, or evicted: decode again
            display = load_image(source, display_side=DISPLAY_MAX_SIDE)
            display.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.BICUBIC)
        return display

    def caption(
        self,
        image: dict[str, Any] | str | None,
        decoding: Literal["greedy", "beam"] = "beam",
        num_beams: int = 3,
        max_length: int = 30,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM_SIZE,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    ) -> tuple[str, dict[str, Any]]:
        """Caption an image and give, for every word, a heatmap of where the model looked.

        Args:
            image: the image: an https URL or a data URL (data:image/png;base64,...); from the UI, an upload.
            decoding: "beam" (beam search, better captions) or "greedy" (faster).
            num_beams: beams for beam search, 1 to 5.
            max_length: longest caption in tokens (at most the model's positions less one).
            length_penalty: beam search only; above 1 favours longer captions.
            no_repeat_ngram_size: never repeat a run of this many tokens (0: off); stops loops.
            repetition_penalty: above 1 makes words already written less likely (1: off).

        Returns:
            The caption, and JSON with "caption", "words", "score", "grid_size" [rows, cols], "image_size"
            [width, height], "attention": one [rows][cols] map per word, each summing to 1, and "cell_geometry":
            where each cell's receptive field is centred in the image, cell (row i, col j) at pixel
            (cell_centres_x[j], cell_centres_y[i]), with the formula, "input_size" and "stride" behind it.
        """
        source, name = uploaded_file(image)
        if source is None:
            raise gr.Error("No image yet: upload one, paste it from the clipboard, use the webcam or pick an example.")
        beams = 1 if decoding == "greedy" else max(1, min(5, int(num_beams)))
        try:  # the settings first: their errors name the setting, not the file
            check_decoding_arguments(self.service.captioner, beams, max_length, no_repeat_ngram_size,
                                     repetition_penalty)
        except (TypeError, ValueError) as error:
            raise gr.Error(str(error), print_exception=False) from error
        try:
            picture, result = self.service.caption(source, beams, max_length, length_penalty, no_repeat_ngram_size,
                                                   repetition_penalty, display_side=DISPLAY_MAX_SIDE)
        except ValueError as error:
            message = str(error)
            if isinstance(source, str):
                message = message.replace(repr(source), repr(name)).replace(source, name)  # not the temp path
            raise gr.Error(f"That file can't be captioned: {message}", print_exception=False) from error
        if not result.words:
            gr.Warning("The model wrote no words for this image (try beam search or another image).")
        self._remember_display(source, picture)
        grid = tuple(self.service.captioner.grid_size)
        return result.text, serving.caption_payload(result, grid, original_size(picture), self.service.model_id,
                                                    self.service.captioner.config.image_size)

    def stored_result(self, image: dict[str, Any] | str | None, data: dict[str, Any] | None) -> Result | None:
        """What the views redraw from: a display copy of the image and the words and maps of `data` (the JSON the
        caption step returned). Kept out of that step so that its API (and MCP tool) returns no session state."""
        source, _ = uploaded_file(image)
        if source is None or not data:
            return None
        display = self._display_of(source)
        gh, gw = data["grid_size"]
        attention = np.asarray(data["attention"], dtype=np.float32).reshape(len(data["words"]), gh, gw)
        return Result(image=display, words=list(data["words"]), attention=attention,
                      input_size=self.service.captioner.config.image_size)

    def overlay_for(self, state: Result | None, index: int | None, opacity: float) -> Image.Image | None:
        """The heatmap of word `index` over the image (None when there is nothing to show)."""
        if state is None or index is None or not 0 <= int(index) < len(state.words):
            return None
        return overlay(state.image, state.attention[int(index)], alpha=float(opacity), input_size=state.input_size)

    def show_result(self, image: dict[str, Any] | str | None, data: dict[str, Any] | None,
                    opacity: float) -> tuple[Result | None, Any, Any, list[tuple[Image.Image, str]]]:
        """After a run: the stored result, the word picker, the default word's overlay and every word's overlay."""
        state = self.stored_result(image, data)
        if state is None:
            return None, gr.Radio(choices=[], value=None), None, []
        index = _default_word(state.words)
        picker = gr.Radio(choices=[(w, i) for i, w in enumerate(state.words)], value=index)
        return state, picker, self.show_word(state, index, opacity), self.gallery(state, opacity)

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


def legend_html() -> str:
    """A colour bar of the overlay from low to high attention: each stop in its colour at the opacity the overlay
    gives it (its value), over a grey checkerboard that stands for the photo."""
    stops = ", ".join(f"rgba({r}, {g}, {b}, {v:.2f}) {100 * v:.0f}%" for v, (r, g, b) in legend_colours())
    photo = "repeating-conic-gradient(#d0d0d0 0% 25%, #f4f4f4 0% 50%) 0 0 / 12px 12px"
    return (f'<div style="font-size: 0.85em" title="Heatmap colours: the colour map fades into the photo where '
            f'attention is low"><div style="height: 14px; border-radius: 3px; border: 1px solid #999; '
            f'background: linear-gradient(to right, {stops}), {photo}"></div>'
            '<div style="display: flex; justify-content: space-between"><span>low attention (photo unchanged)'
            '</span><span>high attention</span></div></div>')


def _examples() -> list[list[str]]:
    files = sorted(EXAMPLES_DIR.glob("shapes_*.png")) + sorted(EXAMPLES_DIR.glob("*.jpg"))
    return [[str(p)] for p in files]


def create_demo(service: serving.CaptionService) -> gr.Blocks:
    """The Blocks UI over the shared service; its captioning event is the `/caption` API endpoint."""
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
                    longest = longest_caption(service.captioner)  # the decoder's positions
                    max_length = gr.Slider(1, longest, value=min(30, longest), step=1, label="Max length (tokens)")
                    length_penalty = gr.Slider(
                        0.0, 2.0, value=1.0, step=0.1, label="Length penalty (beam search; > 1 favours longer)"
                    )
                    no_repeat = gr.Slider(0, 6, value=DEFAULT_NO_REPEAT_NGRAM_SIZE, step=1,
                                          label="Never repeat a run of this many tokens (0: off)")
                    repetition_penalty = gr.Slider(1.0, 2.0, value=DEFAULT_REPETITION_PENALTY, step=0.05,
                                                   label="Repetition penalty (> 1: words already written less likely)")
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
                gr.HTML(legend_html(), elem_id="heatmap-legend")
                opacity = gr.Slider(0.1, 0.9, value=0.5, step=0.05, label="Heatmap opacity")
        gallery = gr.Gallery(
            label="Every word's heatmap", columns=6, height="auto", object_fit="contain", elem_id="gallery"
        )
        with gr.Accordion("Heatmap data (JSON, as returned by the /caption API)", open=False):
            data = gr.JSON(label="Caption data")
        state = gr.State(None, time_to_live=1800)
        if service.training_data == "synthetic shapes":
            gr.Markdown("This demo model was trained on synthetic coloured shapes only: a photo will be described in "
                        "shape words (\"a red circle ...\"). Serve a Flickr8k model for photos.", elem_id="model-note")
        gr.Markdown(
            f"Model: `{service.model_id}`, trained on {service.training_data}"
            + f" · {_describe_mode(service.fast_mode)}"
            + (f" · attention grid {grid[0]}×{grid[1]}" if grid else "")
            + " · API: `/caption` (gradio_client), `POST /predict`, `GET /health`",
            elem_id="footer-model",
        )

        decoding.change(
            lambda d: gr.Slider(interactive=d == "beam"), decoding, num_beams, api_visibility="private", queue=False
        )
        run.click(
            ui.caption,
            inputs=[image, decoding, num_beams, max_length, length_penalty, no_repeat, repetition_penalty],
            outputs=[caption, data],
            api_name="caption",
            concurrency_id="model",
            concurrency_limit=MODEL_CONCURRENCY,
            preprocess=False,
        ).success(ui.show_result, inputs=[image, data, opacity], outputs=[state, words, heatmap, gallery],
                  preprocess=False, api_visibility="private")
        words.input(ui.show_word, inputs=[state, words, opacity], outputs=heatmap, api_visibility="private")
        opacity.release(
            ui.restyle, inputs=[state, words, opacity], outputs=[heatmap, gallery], api_visibility="private"
        )
        gallery.select(
            ui.pick_from_gallery, inputs=[state, opacity], outputs=[words, heatmap], api_visibility="private"
        )
    demo.queue(default_concurrency_limit=MODEL_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    return demo


def _describe_mode(fast_mode: dict[str, str]) -> str:
    """The footer's words for the mode served, e.g. "fast mode int8-vnni (AVX512-VNNI: 8-bit int8 weights)"."""
    if fast_mode["mode"] == "fp32":
        return f"fp32 ({fast_mode['reason']})"
    return f"fast mode {fast_mode['mode']} ({fast_mode['reason']})"


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        sys.exit(f"app.py: ${name} must be a whole number of threads, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """The command line; each default comes from its environment variable (a Space sets them as variables)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hub repo id or checkpoint folder (default: $CAPTION_MODEL, then a local one)")
    parser.add_argument("--revision", default=os.environ.get("CAPTION_MODEL_REVISION") or None,
                        help="branch, tag or commit of a Hub model (default $CAPTION_MODEL_REVISION, else main; "
                             "push_to_hub.py --revision sets it on the Space)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--precision", choices=serving.PRECISIONS, default=os.environ.get("CAPTION_PRECISION", "auto"),
                        help="auto (default, $CAPTION_PRECISION; 'int8' means the same): the fast CPU mode chosen "
                             "for this CPU (int8-vnni with AVX512-VNNI, int8-avx2 on other x86-64, fp32 on ARM); "
                             "int8-vnni / int8-avx2 force one; fp32: the weights exactly as trained")
    parser.add_argument("--threads", type=int, default=_int_env("CAPTION_THREADS"),
                        help="CPU threads for inference (default $CAPTION_THREADS, else the CPUs this process may "
                             "use: its affinity capped by the container's CPU quota, not the host's core count)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"],
                        default=os.environ.get("CAPTION_DEVICE", "auto"),
                        help="where the model runs (default auto, $CAPTION_DEVICE: a GPU if there is one, half "
                             "precision there; --precision int8 applies on the CPU only)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, then serving loads the model once and serves this UI until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        service = serving.start_service(args.model, precision=args.precision, threads=args.threads,
                                        device=args.device, revision=args.revision)
    except serving.ModelLoadError as error:
        sys.exit(f"app.py: {error}")
    serving.serve(service, create_demo(service), args.host, args.port, mcp_server.build_mcp_server(service))


if __name__ == "__main__":
    main()
