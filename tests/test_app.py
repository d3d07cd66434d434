"""app.py and serving.py: a real server on localhost (gradio_client on /caption, HTTP /predict and /health), the UI
handlers, bad inputs everywhere, model resolution and start-up errors, and a small load run."""

from __future__ import annotations

import ast
import inspect
import sys
import types
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from app_helpers import ROOT, bad_files, build_app, good_images, serve
from gradio_client import Client, handle_file
from PIL import Image

import app
import serving
from caption_model import ImageCaptioner

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint) -> ImageCaptioner:
    return serving.load_captioner(tiny_checkpoint)


@pytest.fixture(scope="module")
def ui(captioner, tiny_checkpoint) -> app.CaptionUI:
    return app.CaptionUI(serving.CaptionService(captioner, tiny_checkpoint))


@pytest.fixture(scope="module")
def server(captioner, tiny_checkpoint):
    with serve(build_app(captioner, tiny_checkpoint)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server + "/", verbose=False)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """Every good and bad test file written to disk (what an upload becomes)."""
    paths = {}
    for name, data in {**good_images(), **{n: b for n, (b, _) in bad_files().items()}}.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    return paths


def shapes_png(tmp_path: Path) -> Path:
    path = tmp_path / "shapes.png"
    path.write_bytes((ROOT / "examples" / "shapes_9.png").read_bytes())
    return path


def assert_caption_data(data: dict, caption: str, grid: tuple[int, int], nonempty: bool = True) -> None:
    """The JSON a program gets: words, grid size and one normalised map per word."""
    assert data["caption"] == caption and " ".join(data["words"]) == caption
    assert bool(data["words"]) or not nonempty, "an in-distribution image should get words"
    assert data["grid_size"] == list(grid)
    geometry = data["cell_geometry"]  # where each cell sits in the image (tests/test_heatmap_geometry.py: values)
    assert (len(geometry["cell_centres_y"]), len(geometry["cell_centres_x"])) == tuple(grid)
    if not data["words"]:
        assert data["attention"] == []
        return
    attention = np.asarray(data["attention"], dtype=np.float64)
    assert attention.shape == (len(data["words"]), *grid)
    np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, atol=1e-3)
    assert isinstance(data["score"], float) and data["score"] <= 0.0


# --- the real server: gradio_client and plain HTTP -----------------------------------------------------------------


def test_client_caption_endpoint_returns_caption_words_and_heatmaps(client, captioner, tmp_path):
    caption, data = client.predict(handle_file(str(shapes_png(tmp_path))), api_name="/caption")
    assert_caption_data(data, caption, captioner.grid_size)
    assert data["image_size"] == list(Image.open(shapes_png(tmp_path)).size)
    # every decoding control reaches the model: greedy equals beam size 1, and max_length caps the caption
    greedy, _ = client.predict(handle_file(str(shapes_png(tmp_path))), "greedy", 5, 30, 1.0, api_name="/caption")
    beam1, _ = client.predict(handle_file(str(shapes_png(tmp_path))), "beam", 1, 30, 1.0, api_name="/caption")
    assert greedy == beam1 == captioner.caption(shapes_png(tmp_path), num_beams=1).text
    short, short_data = client.predict(handle_file(str(shapes_png(tmp_path))), "beam", 3, 3, 1.0, api_name="/caption")
    assert len(short_data["words"]) <= 3 and short == " ".join(short_data["words"])


def test_client_api_lists_only_the_caption_endpoint(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(endpoints) == ["/caption"]
    assert [p["parameter_name"] for p in endpoints["/caption"]["parameters"]] == [
        "image", "decoding", "num_beams", "max_length", "length_penalty", "no_repeat_ngram_size", "repetition_penalty"
    ]  # new parameters only ever come last: positional clients keep working


def test_health_names_the_model(server, tiny_checkpoint):
    response = httpx.get(server + "/health")
    assert response.status_code == 200
    from caption_model.cpu.fast_mode import choose_fast_mode
    from caption_model.cpu.features import describe_cpu

    expected = choose_fast_mode("auto")  # what this CPU gets: int8-vnni with AVX512-VNNI, int8-avx2 elsewhere
    assert response.json() == {"status": "ok", "model": tiny_checkpoint, "revision": "main", "precision": "int8",
                               "fast_mode": {"mode": expected.mode, "reason": expected.reason, "cpu": describe_cpu()},
                               "threads": torch.get_num_threads()}


def test_predict_returns_the_greedy_caption(server, captioner, tmp_path):
    path = shapes_png(tmp_path)
    response = httpx.post(server + "/predict", files={"image": ("shapes.png", path.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["caption"] == captioner.caption(path, num_beams=1).text
    assert " ".join(body["words"]) == body["caption"]


def test_the_ui_page_is_served(server, tiny_checkpoint):
    response = httpx.get(server + "/")
    assert response.status_code == 200 and "<html" in response.text.lower()
    config = httpx.get(server + "/config").json()
    assert any(tiny_checkpoint in str(c.get("props", {}).get("value", "")) for c in config["components"])


@pytest.mark.parametrize("name", list(bad_files()))
def test_predict_refuses_bad_files_with_json_4xx_then_still_serves(server, name, tmp_path):
    data, phrase = bad_files()[name]
    response = httpx.post(server + "/predict", files={"image": (name, data, "application/octet-stream")})
    assert response.status_code == 400
    assert phrase in response.json()["error"]
    good = httpx.post(server + "/predict", files={"image": ("ok.png", shapes_png(tmp_path).read_bytes())})
    assert good.status_code == 200 and good.json()["caption"]


def test_predict_refuses_malformed_requests(server):
    missing = httpx.post(server + "/predict", files={"picture": ("x.png", b"123")})
    assert missing.status_code == 400 and "'image'" in missing.json()["error"]
    not_multipart = httpx.post(server + "/predict", content=b"raw bytes", headers={"content-type": "image/png"})
    assert 400 <= not_multipart.status_code < 500 and "multipart" in not_multipart.json()["error"]
    too_big = httpx.post(server + "/predict", files={"image": ("big.png", b"\0" * (serving.MAX_UPLOAD_BYTES + 10))})
    assert too_big.status_code == 413 and "too large" in too_big.json()["error"]
    assert httpx.get(server + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("name", list(bad_files()))
def test_client_gets_a_clear_error_for_bad_files_then_still_works(client, name, files, tmp_path):
    phrase = bad_files()[name][1]
    with pytest.raises(Exception, match=phrase) as raised:
        client.predict(handle_file(str(files[name])), api_name="/caption")
    assert "can't be captioned" in str(raised.value) and str(tmp_path) not in str(raised.value)
    caption, data = client.predict(handle_file(str(shapes_png(tmp_path))), api_name="/caption")
    assert caption and data["words"]


def test_client_captions_every_kind_of_image_over_the_wire(client, files, captioner):
    # noise images: a tiny shapes model may well answer with no words; the answer must still be complete
    for name in ("cmyk.jpg", "animated.gif", "exif_rotated.jpg", "large.jpg"):
        caption, data = client.predict(handle_file(str(files[name])), "greedy", api_name="/caption")
        assert_caption_data(data, caption, captioner.grid_size, nonempty=False)
    assert data["image_size"] == [4000, 3000]


def test_small_load_run_all_requests_succeed(server, tmp_path):
    from benchmarks.load_test import run_load_test

    stats = run_load_test(server + "/", shapes_png(tmp_path), clients=4, requests_per_client=2)
    assert stats["failures"] == [] and stats["succeeded"] == 8
    assert 0 < stats["p50"] <= stats["p95"]


# --- the UI handlers, without a browser ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(good_images()))
def test_handler_captions_any_readable_image(ui, files, name, captioner):
    text, data = ui.caption(str(files[name]), "greedy", 1, 20, 1.0)
    state = ui.stored_result(str(files[name]), data)
    assert_caption_data(data, text, captioner.grid_size, nonempty=False)  # noise: maybe no words
    upright = Image.open(files[name])
    expected = (upright.height, upright.width) if name == "exif_rotated.jpg" else upright.size
    assert tuple(data["image_size"]) == expected
    assert max(state.image.size) <= app.DISPLAY_MAX_SIDE and state.attention.shape[0] == len(state.words)
    again = ui.stored_result(str(files[name]), data)  # no remembered copy left: decoded again, same picture
    assert again.image.size == state.image.size


def test_a_phone_sized_jpeg_reports_its_own_size_and_is_drawn_small(ui, server, captioner, tmp_path):
    """A 12 MP, EXIF-rotated JPEG: decoded at reduced scale (draft mode), yet the JSON and its cell geometry are in
    the file's own upright pixels; the display copy stays small; /predict captions the same file."""
    stored = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)).resize((4032, 3024))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait: 3024 x 4032
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=90, exif=exif.tobytes())
    text, data = ui.caption(str(path), "greedy", 1, 20, 1.0)
    assert data["image_size"] == [3024, 4032]
    geometry = data["cell_geometry"]
    assert 0 < geometry["cell_centres_x"][0] < geometry["cell_centres_x"][-1] < 3024
    assert 0 < geometry["cell_centres_y"][0] < geometry["cell_centres_y"][-1] < 4032
    state = ui.stored_result(str(path), data)
    assert max(state.image.size) == app.DISPLAY_MAX_SIDE and state.image.height > state.image.width
    response = httpx.post(server + "/predict", files={"image": ("phone.jpg", path.read_bytes(), "image/jpeg")})
    assert response.status_code == 200 and response.json()["caption"] == captioner.caption(path, num_beams=1).text


@pytest.mark.parametrize("name", list(bad_files()))
def test_handler_says_why_a_file_is_refused(ui, files, name):
    with pytest.raises(gr.Error, match=bad_files()[name][1]) as raised:
        ui.caption(str(files[name]), "beam", 3, 30, 1.0)
    assert "can't be captioned" in str(raised.value) and name in str(raised.value)


@pytest.mark.parametrize("empty", [None, ""])
def test_handler_asks_for_an_image_when_there_is_none(ui, empty):
    with pytest.raises(gr.Error, match="No image yet"):
        ui.caption(empty, "beam", 3, 30, 1.0)


def test_views_come_from_the_stored_result(ui, tmp_path, monkeypatch):
    path = str(shapes_png(tmp_path))
    text, data = ui.caption(path, "beam", 3, 30, 1.0)
    # showing the result, changing the word or the opacity must not run the model (or decode the upload) again
    monkeypatch.setattr(ui.service.captioner, "caption", lambda *a, **k: pytest.fail("model called again"))
    monkeypatch.setattr(app, "load_image", lambda *a, **k: pytest.fail("upload decoded a second time"))
    state, picker, heatmap, gallery = ui.show_result(path, data, 0.5)
    np.testing.assert_allclose(state.attention, np.asarray(data["attention"]), atol=1e-6)
    assert [value for _, value in picker.choices] == list(range(len(data["words"])))
    assert [label for label, _ in picker.choices] == data["words"]
    assert data["words"][picker.value] not in app.STOP_WORDS or set(data["words"]) <= app.STOP_WORDS
    assert heatmap.value is not None and f'"{data["words"][picker.value]}"' in heatmap.label
    assert [label for _, label in gallery] == [f"{i + 1}. {w}" for i, w in enumerate(data["words"])]
    assert all(image.size == state.image.size for image, _ in gallery)

    faint = np.asarray(ui.overlay_for(state, 1, 0.1), dtype=np.int16)
    strong = np.asarray(ui.overlay_for(state, 1, 0.9), dtype=np.int16)
    assert np.abs(faint - strong).mean() > 5  # the opacity shows
    maps = [np.asarray(ui.overlay_for(state, i, 0.5), dtype=np.int16) for i in range(len(state.words))]
    assert any(np.abs(maps[0] - m).mean() > 0.5 for m in maps[1:])  # words get their own maps
    assert ui.overlay_for(state, len(state.words), 0.5) is None and ui.overlay_for(None, 0, 0.5) is None

    restyled, regallery = ui.restyle(state, 1, 0.8)
    assert restyled.value is not None and len(regallery) == len(state.words)
    picked, shown = ui.pick_from_gallery(state, 0.5, gr.SelectData(None, {"index": 2, "value": None}))
    assert picked.value == 2 and f'"{state.words[2]}"' in shown.label


def test_create_demo_wires_the_model_name_into_the_footer(captioner):
    demo = app.create_demo(serving.CaptionService(captioner, "someone/shapes-captioner"))
    footer = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "footer-model"]
    assert footer and "someone/shapes-captioner" in footer[0].value
    assert not hasattr(demo, "caption_service")  # the service is passed explicitly, not hung on the Blocks


def test_the_footer_names_the_training_data_and_a_shapes_model_says_so(captioner, tmp_path):
    (tmp_path / "training_config.json").write_text('{"source": "shapes"}')
    demo = app.create_demo(serving.CaptionService(captioner, str(tmp_path)))
    texts = {b.elem_id: b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) in
             ("footer-model", "model-note")}
    assert "trained on synthetic shapes" in texts["footer-model"] and "shape words" in texts["model-note"]
    plain = app.create_demo(serving.CaptionService(captioner, "someone/model"))
    assert "model-note" not in {getattr(b, "elem_id", None) for b in plain.blocks.values()}


def test_the_repetition_controls_reach_the_model(ui, server, tmp_path):
    path = shapes_png(tmp_path)
    _, data = ui.caption(str(path), "greedy", 1, 30, 1.0, 2, 1.0)
    bigrams = list(zip(data["words"], data["words"][1:]))
    assert len(bigrams) == len(set(bigrams))  # no word pair twice
    ok = httpx.post(server + "/predict", files={"image": ("s.png", path.read_bytes(), "image/png")},
                    data={"no_repeat_ngram_size": "2", "repetition_penalty": "1.2"})
    assert ok.status_code == 200, ok.text
    words = ok.json()["words"]
    assert len(list(zip(words, words[1:]))) == len(set(zip(words, words[1:])))
    bad = httpx.post(server + "/predict", files={"image": ("s.png", path.read_bytes(), "image/png")},
                     data={"repetition_penalty": "9"})
    assert bad.status_code == 422 and "repetition_penalty" in bad.json()["error"]


def imported_modules(path: Path) -> set[str]:
    """Every module a Python file imports, function-level imports included."""
    tree = ast.parse(path.read_text())
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names} | {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }


def test_imports_point_one_way_ui_then_serving_then_model():
    serving_imports, app_imports = imported_modules(ROOT / "serving.py"), imported_modules(ROOT / "app.py")
    assert "app" not in serving_imports  # serving never imports the UI
    assert "serving" in app_imports
    assert not any(name.split(".")[0] in {"fastapi", "starlette", "uvicorn"} for name in app_imports)  # no routes


# --- model resolution and start-up errors --------------------------------------------------------------------------


def test_model_comes_from_the_flag_then_the_environment(monkeypatch):
    monkeypatch.setenv("CAPTION_MODEL", "env/model")
    assert serving.resolve_model("flag/model") == "flag/model"
    assert serving.resolve_model(None) == "env/model"


def test_a_local_checkpoint_is_used_when_nothing_is_configured(monkeypatch, tmp_path):
    monkeypatch.delenv("CAPTION_MODEL", raising=False)
    local = tmp_path / "checkpoints" / "shapes" / "best"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    monkeypatch.setattr(serving, "LOCAL_CHECKPOINT", local)
    monkeypatch.setattr(serving, "CACHE_CHECKPOINT", tmp_path / "cache" / "best")
    monkeypatch.setitem(sys.modules, "caption_model.training", None)  # training must not be needed
    assert serving.resolve_model(None) == str(local)


def test_without_any_model_the_shapes_preset_is_trained_once(monkeypatch, tmp_path, tiny_checkpoint, capsys):
    monkeypatch.delenv("CAPTION_MODEL", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setattr(serving, "LOCAL_CHECKPOINT", tmp_path / "checkpoints" / "shapes" / "best")
    monkeypatch.setattr(serving, "CACHE_CHECKPOINT", tmp_path / "cache" / "shapes" / "best")
    calls = []

    def train_preset(preset, output_dir):
        calls.append((preset, Path(output_dir)))
        best = Path(output_dir) / "best"
        best.mkdir(parents=True)
        for item in Path(tiny_checkpoint).iterdir():
            (best / item.name).write_bytes(item.read_bytes())
        return best

    plan = types.SimpleNamespace(train_preset=train_preset, preset_plan=lambda preset: "750 steps (6 epochs)")
    monkeypatch.setitem(sys.modules, "caption_model.training", plan)
    resolved = serving.resolve_model(None)
    assert calls == [("shapes", tmp_path / "checkpoints" / "shapes")]
    # the newcomer is told what happens, for how long, and where the model goes (before training starts)
    told = " ".join(capsys.readouterr().err.split())
    best = str(tmp_path / "checkpoints" / "shapes" / "best")
    assert f"no checkpoint at {best}" in told and "Training the small 'shapes' demo model" in told
    assert "750 steps (6 epochs)" in told and "printed after the first steps" in told
    assert f"saved to {best} and reused on every later start" in told
    assert resolved == str(tmp_path / "checkpoints" / "shapes" / "best")
    assert serving.load_captioner(resolved).caption(ROOT / "examples" / "shapes_9.png").text
    assert serving.resolve_model(None) == resolved and len(calls) == 1  # the second start reuses it


def test_on_a_space_the_fallback_trains_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("CAPTION_MODEL", raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/space")
    monkeypatch.setattr(serving, "LOCAL_CHECKPOINT", tmp_path / "checkpoints" / "shapes" / "best")
    monkeypatch.setattr(serving, "CACHE_CHECKPOINT", tmp_path / "cache" / "shapes" / "best")
    seen = []

    def train_preset(preset, output_dir):  # finishes without writing a checkpoint
        seen.append(output_dir)
        return Path(output_dir) / "best"

    monkeypatch.setitem(sys.modules, "caption_model.training", types.SimpleNamespace(train_preset=train_preset))
    with pytest.raises(serving.ModelLoadError, match="holds no checkpoint"):
        serving.resolve_model(None)
    assert seen == [tmp_path / "cache" / "shapes"]


def test_missing_training_code_gives_a_clear_error(monkeypatch, tmp_path):
    """A Space bundle ships caption_model without training/: no fallback, a message that says what to pass."""
    monkeypatch.delenv("CAPTION_MODEL", raising=False)
    monkeypatch.setattr(serving, "LOCAL_CHECKPOINT", tmp_path / "none" / "best")
    monkeypatch.setattr(serving, "CACHE_CHECKPOINT", tmp_path / "cache" / "best")
    monkeypatch.setitem(sys.modules, "caption_model.training", None)
    with pytest.raises(serving.ModelLoadError, match="--model") as raised:
        serving.resolve_model(None)
    assert "caption_model.training" in str(raised.value)


def test_start_up_errors_say_what_was_expected(tmp_path, monkeypatch):
    with pytest.raises(serving.ModelLoadError, match="does not exist"):
        serving.load_captioner(str(tmp_path / "missing"))
    with pytest.raises(serving.ModelLoadError, match="config.json"):
        serving.load_captioner(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(serving.ModelLoadError, match="HF_HUB_OFFLINE"):
        serving.load_captioner("nobody/no-such-captioner")
    with pytest.raises(SystemExit, match="app.py: model folder .* does not exist"):
        app.main(["--model", str(tmp_path / "missing")])


def test_thread_count_is_checked_before_anything_loads(tmp_path, monkeypatch, capsys):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit):
        app.main(["--model", str(tmp_path / "missing"), "--threads", "0"])
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    monkeypatch.setenv("CAPTION_THREADS", "two")
    with pytest.raises(SystemExit, match=r"CAPTION_THREADS must be a whole number of threads, got 'two'"):
        app.main(["--model", str(tmp_path / "missing")])
    monkeypatch.setenv("CAPTION_THREADS", "1")
    try:
        with pytest.raises(SystemExit, match="does not exist"):  # threads are set first, then the model fails
            app.main(["--model", str(tmp_path / "missing")])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_app_serves_the_fast_mode_unless_fp32_is_asked(tiny_checkpoint):
    """Default: int8 decoder (the fast CPU path); --precision fp32 keeps the trained weights as they are."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    quantized = serving.load_captioner(tiny_checkpoint)
    exact = serving.load_captioner(tiny_checkpoint, precision="fp32")
    forced = serving.load_captioner(tiny_checkpoint, precision="int8-avx2")
    assert quantized.quantized and not exact.quantized
    assert forced.fast_mode == "int8-avx2" and forced.fast_mode_reason == "asked for"
    with pytest.raises(serving.ModelLoadError, match="precision must be one of auto, int8, int8-vnni"):
        serving.load_captioner(tiny_checkpoint, precision="int4")
    assert any(isinstance(m, DynamicLinear) for m in quantized.decoder.modules())
    assert not any(isinstance(m, DynamicLinear) for m in exact.decoder.modules())
    image = ROOT / "examples" / "shapes_24.png"
    fast, reference = quantized.caption(image, num_beams=1), exact.caption(image, num_beams=1)
    assert fast.text and fast.attention.shape[0] == len(fast.words)
    assert reference.text and reference.attention.shape[0] == len(reference.words)


def test_training_offers_the_fallback_serving_expects():
    from caption_model.training import PRESETS, preset_plan, train_preset

    inspect.signature(train_preset).bind("shapes", output_dir=Path("checkpoints/shapes"))
    shapes = PRESETS["shapes"]
    steps = -(-shapes["shapes_sizes"][0] // shapes["batch_size"]) * shapes["epochs"]
    assert preset_plan("shapes").startswith(f"{steps} steps ({shapes['epochs']} epochs of "
                                            f"{shapes['shapes_sizes'][0]} synthetic images")


def test_serving_writes_only_to_temp_dirs(client, tmp_path):
    import tempfile

    client.predict(handle_file(str(shapes_png(tmp_path))), api_name="/caption")
    assert not list(ROOT.glob("*.pyi"))  # Gradio writes one next to a module that subclasses a component
    cache = Path(gr.utils.get_upload_folder()).resolve()
    assert cache.is_relative_to(Path(tempfile.gettempdir()).resolve())


def test_an_empty_caption_is_shown_not_crashed_on(ui, tmp_path, monkeypatch, captioner):
    from caption_model import Caption

    empty = Caption(text="", words=[], attention=np.zeros((0, *captioner.grid_size), np.float32), score=-9.0)
    monkeypatch.setattr(ui.service.captioner, "caption", lambda *a, **k: empty)
    path = str(shapes_png(tmp_path))
    text, data = ui.caption(path, "beam", 3, 30, 1.0)
    assert text == "" and data["words"] == [] and data["attention"] == []
    assert data["grid_size"] == list(captioner.grid_size)
    state, picker, heatmap, gallery = ui.show_result(path, data, 0.5)
    assert picker.choices == [] and heatmap.value is None and gallery == []


def test_main_sets_threads_warms_up_and_serves(tiny_checkpoint, monkeypatch):
    """app.main end to end through serving, uvicorn.run caught: threads set, the model warmed up (a greedy and a
    beam caption) before serving, and the served app answers /health with what was asked for."""
    import uvicorn

    served, warmed = {}, []
    real_warm_up = serving.warm_up

    def spy_warm_up(captioner):
        calls = []
        original = captioner.caption
        captioner.caption = lambda image, **kw: calls.append(kw["num_beams"]) or original(image, **kw)
        real_warm_up(captioner)
        del captioner.caption
        warmed.append(calls)

    monkeypatch.setattr(serving, "warm_up", spy_warm_up)
    monkeypatch.setattr(uvicorn, "run", lambda asgi, **kw: served.update(app=asgi, **kw))
    threads = torch.get_num_threads()
    try:
        app.main(["--model", tiny_checkpoint, "--precision", "fp32", "--threads", "1", "--port", "7999"])
        assert warmed == [[1, 3]] and served["port"] == 7999
        with serve(served["app"]) as url:
            health = httpx.get(url + "/health").json()
        assert health["precision"] == "fp32" and health["threads"] == 1 and health["model"] == tiny_checkpoint
        assert health["fast_mode"]["mode"] == "fp32" and health["fast_mode"]["reason"].startswith("asked for")
    finally:
        torch.set_num_threads(threads)


def test_the_device_is_checked_before_anything_loads(tiny_checkpoint):
    assert serving.resolve_device("cpu").type == "cpu"
    gpu = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert serving.resolve_device("auto").type == gpu
    with pytest.raises(serving.ModelLoadError, match="must be auto, cpu, cuda or mps"):
        serving.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(serving.ModelLoadError, match="no such device"):
            serving.load_captioner(tiny_checkpoint, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_serving_on_a_gpu_captions_in_half_precision(tiny_checkpoint):
    service = serving.CaptionService(serving.load_captioner(tiny_checkpoint, device="cuda"), tiny_checkpoint)
    assert service.precision == "fp16" and service.captioner.device.type == "cuda"
    serving.warm_up(service.captioner)
    _, caption = service.caption(ROOT / "examples" / "shapes_9.png", 3)
    reference = serving.load_captioner(tiny_checkpoint, precision="fp32").caption(ROOT / "examples" / "shapes_9.png")
    assert caption.words and np.allclose(caption.attention.sum(axis=(1, 2)), 1.0, atol=1e-3)
    if caption.words == reference.words:  # fp16 may flip a near-tie of this tiny model; then only sanity holds
        assert caption.score == pytest.approx(reference.score, abs=0.05)
