"""Stray-mark measure (framework.bundled.marks) and its metric plugin (plugins/metrics/stray_marks.py)."""
from __future__ import annotations

import pytest
import torch

from framework.bundled import marks
from framework.bundled.world import RGB, sample_scenes


def scenes(n=16, seed=3, **kw):
    s = sample_scenes(n, seed, two_shape_rate=0.5, **kw)
    return (s.images + 1) / 2, s.labels


def test_real_scenes_have_no_stray_marks():
    images, labels = scenes(concept_rate=0.5)
    m = marks.measure_scenes(images, labels)
    assert float(m["stray_share"].max()) < 1e-9  # exactly none: every pixel is a scene colour or an edge blend
    assert 0.2 < m["edge_width"] < 0.7  # 1-pixel anti-aliasing (measured 0.41 on 256 scenes)


def test_planted_specks_give_the_planted_share():
    images, labels = scenes(n=4, seed=11)
    spotted = images.clone()
    planted = 0
    for img, lab in zip(spotted, labels):
        # a 2×2 magenta-ish speck inside each shape (centre) and one in a background corner (5, 5)
        for obj in lab.objects:
            cx, cy = int(obj.cx), int(obj.cy)
            img[:, cy - 1:cy + 1, cx - 1:cx + 1] = torch.tensor([0.9, 0.0, 0.9])[:, None, None] \
                if obj.colour != "purple" else torch.tensor([0.0, 0.9, 0.9])[:, None, None]
            planted += 4
        img[:, 5:7, 5:7] = torch.tensor([0.3, 0.9, 0.6])[:, None, None]  # no world colour
        planted += 4
    m = marks.measure_scenes(spotted, labels)
    total = float(m["stray_share"].sum()) * 64 * 64
    assert total == pytest.approx(planted, abs=0.5)
    assert m["stray_images"] == 1.0


def test_blur_widens_edges_and_specks_near_edges_are_blends():
    images, labels = scenes(n=8, seed=5)
    sharp = marks.measure_scenes(images, labels)["edge_width"]
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    m = marks.measure_scenes(blurred, labels)
    assert m["edge_width"] > 1.5 * sharp
    # a 3-pixel blur stays inside the 2-pixel band, but for the tip of a thin apex (measured: 2 pixels
    # of one image in 8, a small triangle's tip, whose clean pixels lie more than 2 pixels away)
    assert float(m["stray_share"].sum()) * 4096 <= 4


def test_prompt_palette_named_background_once():
    img = torch.tensor(RGB["white"])[:, None, None].expand(3, 64, 64).clone()
    img[:, 20:40, 20:40] = torch.tensor(RGB["red"])[:, None, None]
    assert marks.prompt_palette("a red square on a white background", img).shape == (2, 3)  # not 3


def test_prompt_palette_reads_the_background_off_the_border():
    img = torch.tensor(RGB["gray"])[:, None, None].expand(3, 64, 64).clone()
    img[:, 20:40, 20:40] = torch.tensor(RGB["red"])[:, None, None]
    pal = marks.prompt_palette("a red square", img)
    assert pal.shape == (2, 3)
    assert torch.allclose(pal[-1], torch.tensor(RGB["gray"]), atol=1e-6)
    assert float(marks.measure_prompts(img[None], ["a red square"])["stray_share"][0]) < 1e-9
    # a blue square where the prompt says red: the whole square is off the prompt's colours
    wrong = marks.measure_prompts(img[None], ["a blue square"])["stray_share"][0]
    assert float(wrong) == pytest.approx(20 * 20 / 4096, abs=1e-6)  # no second clean colour: no edge band


def test_error_quantile():
    a = torch.zeros(1, 3, 10, 100)
    b = a.clone()
    b[0, 1, 0, :3] = 0.5  # 3 pixels of 1000 off by 0.5 (one channel)
    assert marks.error_quantile(b, a, 0.999) == pytest.approx(0.5)
    assert marks.error_quantile(b, a, 0.99) == pytest.approx(0.0)


@pytest.mark.slow  # a bundled-model run: about a minute on the shared 2-core machine
def test_stray_marks_metric_in_a_run(tmp_path):
    from framework.entry.api import run

    res = run(["model=bundled", "metrics=[stray_marks]", "num_samples=2", "batch_size=2", "steps=4",
               "prompts=[a red circle,a blue square]"], output_dir=tmp_path)
    m = res.record["metrics"]
    assert m["stray_marks_n"] == 2
    assert 0.0 <= m["stray_marks_share"] <= 1.0 and m["stray_marks_share"] <= m["stray_marks_max"]
    assert m["stray_marks_edge_width"] > 0


def test_stray_marks_rejects_bad_thresholds():
    from types import SimpleNamespace

    from framework.core.errors import ConfigError
    from framework.core.state import Stash
    from plugins.metrics.stray_marks import StrayMarks

    run = SimpleNamespace(model=SimpleNamespace(has_decoder=True), stash=Stash())
    StrayMarks().configure(run)
    with pytest.raises(ConfigError, match="far"):
        StrayMarks(far=3.0).configure(run)
    with pytest.raises(ConfigError, match="band"):
        StrayMarks(band=1.5).configure(run)
    with pytest.raises(ConfigError, match="no decoder"):
        StrayMarks().configure(SimpleNamespace(model=SimpleNamespace(has_decoder=False), stash=Stash()))


def test_stripe_bands_count_in_pictures_flagged_striped_only():
    from framework.bundled import load_judge

    scenes = sample_scenes(16, 7, concept_rate=1.0, two_shape_rate=0.0)  # striped shapes; captions never say so
    images = (scenes.images + 1) / 2
    assert all("striped" not in c for c in scenes.captions)
    plain = marks.measure_prompts(images, scenes.captions)["stray_share"]
    assert float(plain.mean()) > 0.002  # the dark bands, unflagged, are off the prompt's colours
    flags = load_judge().predict(scenes.images)["striped"]
    assert int(flags.sum()) >= 15
    flagged = marks.measure_prompts(images, scenes.captions, striped=flags)["stray_share"]
    assert float(flagged[flags == 1].max()) < 1e-9
    # the bands are the shape colours' only: a named background's are not added
    img = torch.tensor(RGB["white"])[:, None, None].expand(3, 64, 64).clone()
    img[:, 20:40, 20:40] = torch.tensor(RGB["red"])[:, None, None]
    assert marks.prompt_palette("a red square on a white background", img, striped=True).shape == (2 + 4, 3)
