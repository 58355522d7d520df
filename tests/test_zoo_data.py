"""Procedural shapes data and the evaluator that reads it back."""

import numpy as np
import pytest

from pipelines.zoo.evaluate import (
    ATTRIBUTES,
    chance_rates,
    features,
    frechet_distance,
    parse_prompt,
    score_clips,
    score_images,
)
from pipelines.zoo.shapes import (
    CELLS,
    DIRECTIONS,
    HELDOUT_TRIPLES,
    MAX_OBJECTS,
    SPLIT_SIZES,
    caption,
    render_clip,
    render_image,
    sample_scenes,
)


def _novel(scene):
    return any((o.colour, o.shape, o.cell) in HELDOUT_TRIPLES for o in scene.objects)


def test_scenes_are_deterministic():
    a = sample_scenes("train", 20, start=5, partial=0.2)
    b = sample_scenes("train", 20, start=5, partial=0.2)
    assert a == b
    assert np.array_equal(render_image(a[0]), render_image(b[0]))
    assert sample_scenes("train", 3, start=0) != sample_scenes("train", 3, start=3)


def test_splits_are_disjoint_and_heldout_has_novel_combinations():
    train = sample_scenes("train", 3000)
    held = sample_scenes("heldout", 300)
    calib = sample_scenes("calibration", 100)
    assert not any(_novel(s) for s in train)
    assert not {s.key() for s in train} & ({s.key() for s in held} | {s.key() for s in calib})
    frac = np.mean([_novel(s) for s in held])
    assert 0.25 < frac < 0.45
    # every attribute value occurs in training (only the combinations are new)
    seen = {(o.colour, o.shape) for s in train for o in s.objects}
    assert {(c, s) for c, s, _ in HELDOUT_TRIPLES} <= seen


def test_clip_splits_have_the_training_object_count_and_stay_disjoint():
    train = sample_scenes("train", 2000, video=True)
    held = sample_scenes("heldout", SPLIT_SIZES[True]["heldout"], video=True)
    calib = sample_scenes("calibration", SPLIT_SIZES[True]["calibration"], video=True)
    assert max(len(s.objects) for s in held) == max(len(s.objects) for s in train) == MAX_OBJECTS[True]
    assert not {s.key() for s in train} & ({s.key() for s in held} | {s.key() for s in calib})
    # every direction and cell still reaches training
    assert {o.direction for s in train for o in s.objects} == set(DIRECTIONS)
    assert {o.cell for s in train for o in s.objects} == set(CELLS)


def test_training_object_count_weights():
    counts = np.bincount([len(s.objects) for s in sample_scenes("train", 600, count_weights=(1, 2, 3))],
                         minlength=4)[1:]
    assert counts[0] < counts[1] < counts[2]            # about 1 : 2 : 3
    assert {len(s.objects) for s in sample_scenes("train", 40, count_weights=(0, 0, 1))} == {3}
    assert sample_scenes("train", 5) == sample_scenes("train", 5, count_weights=None)   # default unchanged
    with pytest.raises(ValueError, match="training split only"):
        sample_scenes("heldout", 5, count_weights=(1, 1, 1))


def test_fixed_splits_refuse_scenes_past_their_list():
    n = SPLIT_SIZES[True]["heldout"]
    assert len(sample_scenes("heldout", 1, start=n - 1, video=True)) == 1
    with pytest.raises(ValueError, match="heldout split has 256 clip scenes"):
        sample_scenes("heldout", 2, start=n - 1, video=True)


def test_caption_round_trips_through_the_parser():
    for scene in sample_scenes("train", 50, partial=0.3):
        objs = parse_prompt(caption(scene))
        assert len(objs) == len(scene.objects)
        order = scene.order or range(len(scene.objects))
        for parsed, i in zip(objs, order, strict=True):
            o = scene.objects[i]
            assert (parsed["colour"], parsed["shape"]) == (o.colour, o.shape)
            assert parsed["size"] == (o.size if scene.says_size else None)
            assert parsed["position"] == (o.cell if scene.says_position else None)
    with pytest.raises(ValueError, match="not a shapes prompt"):
        parse_prompt("a photo of a cat")


def test_evaluator_reads_real_images_and_is_at_chance_on_noise():
    scenes = sample_scenes("heldout", 200)
    prompts = [caption(s) for s in scenes]
    real = score_images([render_image(s) for s in scenes], prompts)
    assert real["image_accuracy"] >= 0.95
    for attr in ATTRIBUTES:
        assert real["attributes"][attr] >= 0.95, attr
    rng = np.random.default_rng(0)
    noise = score_images([rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in prompts], prompts)
    chance = chance_rates()
    for attr in ATTRIBUTES:
        assert abs(noise["attributes"][attr] - chance[attr]) <= 0.10, (attr, noise["attributes"][attr])
    assert noise["image_accuracy"] == 0.0


def test_evaluator_catches_wrong_attributes():
    scene = sample_scenes("heldout", 1, start=1)[0]
    image = render_image(scene)
    o = scene.objects[scene.order[0]]
    other = next(c for c in ("red", "green", "blue") if c != o.colour)
    wrong = caption(scene).replace(f"{o.colour} {o.shape}", f"{other} {o.shape}", 1)
    assert score_images([image], [caption(scene)])["correct"] == [True]
    assert score_images([image], [wrong])["correct"] == [False]
    blank = np.full_like(image, 245)
    assert score_images([blank], [caption(scene)])["image_accuracy"] == 0.0


def test_clip_evaluator_reads_motion():
    scenes = sample_scenes("heldout", 60, video=True, max_objects=2)
    prompts = [caption(s) for s in scenes]
    clips = [render_clip(s, 9, 128) for s in scenes]
    rep = score_clips(clips, prompts)
    assert rep["attributes"]["direction"] >= 0.95
    assert rep["image_accuracy"] >= 0.9
    reversed_rep = score_clips([c[::-1] for c in clips], prompts)
    assert reversed_rep["attributes"]["direction"] < 0.1
    # a first frame without the object (the Wan VAE's weak frame 0) does not change the reading
    blanked = [np.concatenate([np.full_like(c[:1], 245), c[1:]]) for c in clips]
    assert score_clips(blanked, prompts)["attributes"]["direction"] >= 0.95
    # an object found in one frame only gives no direction
    single = [np.concatenate([c[4:5], np.full_like(c[1:], 245)]) for c in clips]
    assert score_clips(single, prompts)["attributes"]["direction"] < 0.5


def test_frechet_distance():
    scenes = sample_scenes("heldout", 64)
    a = np.stack([features(render_image(s)) for s in scenes[:32]])
    b = np.stack([features(render_image(s)) for s in scenes[32:]])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(0)
    noise = np.stack([features(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(32)])
    assert frechet_distance(a, noise) > 5 * frechet_distance(a, b)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :5])
