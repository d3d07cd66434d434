"""The app in a real headless browser (Debian chromium driven by Playwright): upload, caption, pick a word, see its
overlay and the colour legend; bad input gets a readable message. Saves test-artifacts/app_browser.png (a shapes
image) and test-artifacts/app_browser_photo.png (a photo)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from app_helpers import ROOT, build_app, serve
from PIL import Image
from playwright.sync_api import expect, sync_playwright

import app
import serving
from caption_model.heatmap import overlay
from caption_model.processing import load_image

pytestmark = pytest.mark.timeout(600)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SCREENSHOT = ROOT / "test-artifacts" / "app_browser.png"
PHOTO_SCREENSHOT = ROOT / "test-artifacts" / "app_browser_photo.png"
TIMEOUT_MS = 120_000  # a shared 2-core machine can be slow; waits end as soon as the page is ready


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    return serving.load_captioner(tiny_checkpoint)


@pytest.fixture(scope="module")
def server(captioner, tiny_checkpoint):
    with serve(build_app(captioner, tiny_checkpoint)) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (scripts/ensure_chromium.sh)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server + "/", wait_until="load")
        page.wait_for_selector("#run-button")
        yield page
        browser.close()


def fetch_image(page, locator) -> np.ndarray:
    """The picture an <img> shows, fetched from the server as the browser would."""
    source = locator.get_attribute("src")
    body = page.request.get(source).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16)


def test_upload_caption_pick_a_word_and_see_its_overlay(page, captioner, tiny_checkpoint):
    expect(page.locator("#footer-model")).to_contain_text(tiny_checkpoint)

    # nothing uploaded yet: a message, not a crash
    page.locator("#run-button").click()
    expect(page.locator("[data-testid='toast-body']")).to_contain_text("No image yet")
    page.locator("[data-testid='toast-close']").first.click()  # keep the screenshot clear
    expect(page.locator("[data-testid='toast-body']")).to_have_count(0)

    for source in ("Upload file", "Capture from camera", "Paste from clipboard"):  # upload, webcam, clipboard
        expect(page.locator(f"#input-image button[aria-label='{source}']")).to_be_visible()

    image_path = ROOT / "examples" / "shapes_33.png"
    page.locator("#input-image input[type=file]").set_input_files(str(image_path))
    expect(page.locator("#input-image img").first).to_be_visible()
    page.locator("#run-button").click()

    expected = captioner.caption(image_path, num_beams=3, max_length=30)  # the UI's default decoding
    expect(page.locator("#caption textarea")).to_have_value(expected.text)
    labels = page.locator("#word-picker label")
    expect(labels).to_have_count(len(expected.words))
    assert [text.strip() for text in labels.all_inner_texts()] == expected.words

    # one overlay per word in the gallery
    expect(page.locator("#gallery img")).to_have_count(len(expected.words))

    # pick a word: the overlay shows that word's heatmap, exactly as caption_model.heatmap draws it
    overlay_img = page.locator("#overlay img").first
    first_src = overlay_img.get_attribute("src")
    index = next(i for i, w in enumerate(expected.words) if i != app._default_word(expected.words))
    labels.nth(index).click()
    expect(page.locator("#overlay")).to_contain_text(f'Where the model looked for "{expected.words[index]}"')
    expect(overlay_img).not_to_have_attribute("src", first_src)
    shown = fetch_image(page, overlay_img)
    # the views redraw from the /caption JSON, whose maps are rounded to 6 decimals
    drawn_map = np.round(expected.attention[index], 6)
    drawn = overlay(load_image(image_path), drawn_map, alpha=0.5, input_size=captioner.config.image_size)
    drawn = np.asarray(drawn, dtype=np.int16)
    assert shown.shape == drawn.shape and np.abs(shown - drawn).max() <= 1

    # the colour legend beside the heatmap: low to high attention
    legend = page.locator("#heatmap-legend")
    expect(legend).to_be_visible()
    expect(legend).to_contain_text("low attention")
    expect(legend).to_contain_text("high attention")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_a_photo_gets_a_caption_and_its_overlay(page, captioner):
    photo = sorted((ROOT / "examples").glob("*.jpg"))[0]
    page.locator("#input-image button[aria-label='Remove Image']").first.click()
    page.locator("#input-image input[type=file]").set_input_files(str(photo))
    expect(page.locator("#input-image img").first).to_be_visible()
    page.locator("#run-button").click()
    # what the app computes for this upload: the model reads the display copy (a JPEG decoded at reduced scale), whose
    # pixels differ slightly from the model-sized decode of captioner.caption(path); on a photo, far from the shapes
    # this test model knows, two words can be near-tied, so only the same pixels give a comparable caption
    _, expected = serving.CaptionService(captioner, "test").caption(photo, num_beams=3, max_length=30,
                                                                    display_side=app.DISPLAY_MAX_SIDE)
    expect(page.locator("#caption textarea")).to_have_value(expected.text)
    expect(page.locator("#gallery img")).to_have_count(len(expected.words))  # the views are drawn
    if expected.words:
        default = expected.words[app._default_word(expected.words)]
        expect(page.locator("#overlay")).to_contain_text(f'Where the model looked for "{default}"')
        expect(page.locator("#overlay img").first).to_be_visible()
    page.screenshot(path=str(PHOTO_SCREENSHOT), full_page=True)
    assert PHOTO_SCREENSHOT.stat().st_size > 10_000


def test_a_bad_file_gets_a_readable_message_and_the_page_keeps_working(page, captioner, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is a text file, not a picture\n" * 20)
    page.locator("#input-image button[aria-label='Remove Image']").first.click()
    page.locator("#input-image input[type=file]").set_input_files(str(bad))
    page.locator("#run-button").click()
    expect(page.locator("[data-testid='toast-body']")).to_contain_text("not an image")
    expect(page.locator("[data-testid='toast-body']")).to_contain_text("notes.png")

    page.locator("#input-image button[aria-label='Remove Image']").first.click()
    page.locator("#input-image input[type=file]").set_input_files(str(ROOT / "examples" / "shapes_9.png"))
    expect(page.locator("#input-image img").first).to_be_visible()
    page.locator("#caption textarea").evaluate("el => { el.value = ''; }")  # so the next value is the new run's
    page.locator("#run-button").click()
    expected = captioner.caption(ROOT / "examples" / "shapes_9.png", num_beams=3, max_length=30)
    expect(page.locator("#caption textarea")).to_have_value(expected.text)
