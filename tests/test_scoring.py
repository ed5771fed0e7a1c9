"""Evaluation scores on constructed cases with known answers: the retrieval rule for ties and duplicate
captions, its chance level, and the caption scores."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from opt_ds.evaluate.scoring import caption_scores, chance_recall, recall_at, same_caption, word_error_rate


def test_a_tie_with_a_wrong_candidate_is_a_miss():
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.0], [0.3, 0.3, 0.3]])
    correct = torch.eye(3, dtype=torch.bool)
    recall = recall_at(scores, correct, (1, 2, 3))
    # query 0 ties one wrong candidate (rank 1), query 1 is first (rank 0), query 2 ties two (rank 2)
    assert recall == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


def test_a_duplicate_caption_counts_as_correct():
    captions = ["Two red squares.", "a blue circle", "two  red squares", "one cross"]
    correct = same_caption(captions)
    assert correct.tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]
    # image 0's caption is sample 2's word for word: text 2 retrieved first is a hit, text 1 first is a miss
    scores = torch.tensor([[0.1, 0.0, 0.9, 0.0], [0.0, 0.2, 0.0, 0.8], [0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert recall_at(scores, correct, (1,))[1] == pytest.approx(3 / 4)


def test_chance_matches_the_mean_over_every_ranking():
    captions = ["a", "b", "a", "c", "a", "d"]
    correct = same_caption(captions)
    n = len(captions)
    hits = {k: 0.0 for k in (1, 2, 3)}
    orders = list(itertools.permutations(range(n)))
    for order in orders:  # every ranking of the candidates, the same for all queries
        scores = torch.tensor([[float(n - order.index(j)) for j in range(n)]] * n)
        for k, r in recall_at(scores, correct, tuple(hits)).items():
            hits[k] += r / len(orders)
    assert chance_recall(correct, tuple(hits)) == pytest.approx(hits)
    assert chance_recall(torch.eye(200, dtype=torch.bool), (1, 10)) == pytest.approx({1: 1 / 200, 10: 10 / 200})


def test_caption_scores_known_values():
    perfect = caption_scores(
        ["two red squares here", "a big blue circle"], [["Two red squares here."], ["a big blue circle"]]
    )
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    wrong = caption_scores(["one cross", "one cross"], [["two red squares here"], ["a big blue circle"]])
    assert wrong["BLEU-4"] < 1e-6 and wrong["CIDEr"] == 0.0
    half = caption_scores(["a red circle", "two blue squares"], [["a red circle"], ["two red squares"]])
    assert 0 < half["BLEU-4"] < 1 and 0 < half["CIDEr"] < perfect["CIDEr"]
    assert word_error_rate(["a red circle", "two blue"], ["a red circle", "two red squares"]) == pytest.approx(2 / 6)
    assert math.isfinite(word_error_rate(["", "x"], ["a b", "c"]))


def test_synthetic_attributes_are_read_back_from_captions_and_pictures():
    """The scorers of generated captions and pictures give the known answer on the generator's own output,
    through JPEG, for every colour, shape and count."""
    import io
    import random

    import numpy as np
    from PIL import Image

    from opt_ds.data.synthetic import COLOURS, SHAPES, describe, draw_image, drawn_colour, named_attributes

    for n, (colour, shape, count) in enumerate(itertools.product(COLOURS, SHAPES, range(1, 5))):
        buf = io.BytesIO()
        draw_image(count, colour, shape, 64, random.Random(n)).save(buf, format="JPEG", quality=90)
        assert drawn_colour(np.array(Image.open(buf))) == colour, (colour, shape, count)
        for template in range(3):
            named = named_attributes(describe(count, colour, shape, template))
            assert named == {"count": ("one", "two", "three", "four")[count - 1], "colour": colour, "shape": shape}
    assert drawn_colour(np.full((64, 64, 3), 128, np.uint8)) is None  # a flat grey picture shows no colour
    assert named_attributes("a picture of of of") == {} and named_attributes("red and blue circles") == {
        "shape": "circle"
    }


def test_attribute_share_counts_only_references_that_name_the_attributes():
    from opt_ds.evaluate.scoring import attribute_scores, attribute_share

    generated = ["two red squares", "a picture of three", "one blue cross", "a dog"]
    references = ["two red squares", "three green circles", "four blue crosses", "a cat on a mat"]
    assert attribute_share(generated, references, ("colour", "shape")) == pytest.approx(2 / 3)
    assert attribute_share(["a dog"], ["a cat"], ("colour",)) is None
    assert attribute_scores(generated, references) == pytest.approx(
        {"colour": 2 / 3, "shape": 2 / 3, "count": 2 / 3, "colour_and_shape": 2 / 3}
    )
    assert attribute_scores(["a dog"], ["a cat"]) == {}
