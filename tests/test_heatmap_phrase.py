"""heatmap.phrase_maps, the "phrase" reading of a caption's word maps (CaptionerConfig.heatmap_reading)."""

from __future__ import annotations

import numpy as np
import pytest

from caption_model.heatmap import phrase_maps

P = 4  # cells of a (2, 2) grid
DIFFUSE = np.full((2, 2), 1 / P)  # "a"
RED = np.array([[0.48, 0.04], [0.44, 0.04]])  # two red objects, cells 0 and 2
CIRCLE = np.array([[0.02, 0.02], [0.94, 0.02]])  # the circle is at cell 2


def test_a_peaked_neighbour_decides_an_ambiguous_word():
    """"a [red] circle": "red" is split between two red objects and points at the wrong one alone; "circle"
    decides. Every map still sums to 1, "circle" stays where it was."""
    maps = phrase_maps(np.stack([DIFFUSE, RED, CIRCLE]))  # (3, 2, 2)
    assert maps.shape == (3, 2, 2) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-6)
    assert RED.argmax() == 0 and maps[1].argmax() == 2
    assert maps[2].argmax() == 2 and maps[2].max() > CIRCLE.max()


def test_diffuse_neighbours_change_nothing_and_the_ends_have_one_neighbour():
    np.testing.assert_allclose(phrase_maps(np.stack([DIFFUSE, DIFFUSE])), np.stack([DIFFUSE, DIFFUSE]), atol=1e-7)
    np.testing.assert_allclose(phrase_maps(np.stack([DIFFUSE, CIRCLE]))[1], CIRCLE, atol=1e-6)  # "a" adds nothing
    np.testing.assert_allclose(phrase_maps(CIRCLE[None]), CIRCLE[None], atol=1e-6)  # a one-word caption
    assert phrase_maps(np.zeros((0, 2, 2))).shape == (0, 2, 2)


def test_a_map_without_words_axis_is_refused():
    with pytest.raises(ValueError, match=r"\(N, gh, gw\)"):
        phrase_maps(CIRCLE)


def test_a_noun_one_cell_beside_its_colour_word_still_decides():
    """"a [red] circle" where "red" peaks on another red object and, a little lower, on the circle's left edge, one
    cell from where "circle" peaks: the neighbour's vote, spread over a cell, finds the circle's edge; an
    unspread vote (vote_sigma=0) meets "red" nowhere and leaves it on the other object."""
    red = np.full((6, 6), 1e-6)
    red[1, 1], red[4, 3] = 0.5, 0.4  # the other red object; the circle's left edge
    circle = np.full((6, 6), 1e-3)  # "circle" is sure of one cell, a little unsure everywhere else
    circle[4, 4] = 0.9
    maps = np.stack([red / red.sum(), circle / circle.sum()])
    assert np.unravel_index(phrase_maps(maps)[0].argmax(), (6, 6)) == (4, 3)
    assert np.unravel_index(phrase_maps(maps, vote_sigma=0)[0].argmax(), (6, 6)) == (1, 1)
