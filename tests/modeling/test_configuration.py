"""HySACConfig: defaults from the reference, round trips, validation."""

from __future__ import annotations

import json
import math

import pytest
from transformers import CLIPTextConfig, CLIPVisionConfig

from hysac_hf import HySACConfig
from hysac_hf.testing import TINY_BOUNDS, TINY_TEXT, TINY_VISION


def make_config(**kwargs) -> HySACConfig:
    return HySACConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, **{"projection_dim": 32, **kwargs})


def test_defaults_follow_the_released_code():
    cfg = HySACConfig()
    assert cfg.model_type == "hysac"
    assert cfg.projection_dim == 768
    assert cfg.curv_init == 1.0 and cfg.learn_curv is True
    assert cfg.feature_scale_init == pytest.approx(768**-0.5)  # log(768^-0.5) in the released code (docs/method.md §3.4)
    assert cfg.logit_scale_init_value == pytest.approx(2.6593, abs=1e-4)
    assert cfg.max_logit_scale == pytest.approx(4.6052, abs=1e-4)
    assert cfg.traversal_offset == 0.8 and cfg.min_radius == 0.1
    assert cfg.bounds is None and cfg.unsafe_thresholds is None
    assert isinstance(cfg.text_config, CLIPTextConfig) and isinstance(cfg.vision_config, CLIPVisionConfig)
    assert make_config(projection_dim=512).feature_scale_init == pytest.approx(512**-0.5)


def test_round_trip_through_dict_and_save_pretrained(tmp_path):
    cfg = make_config(curv_init=2.5, bounds=TINY_BOUNDS, unsafe_thresholds={"image": 0.9}, traversal_offset=0.7)
    again = HySACConfig.from_dict(cfg.to_dict())
    cfg.save_pretrained(tmp_path)
    loaded = HySACConfig.from_pretrained(tmp_path)
    for other in (again, loaded):
        assert other.bounds == TINY_BOUNDS
        assert other.unsafe_thresholds == {"image": 0.9}
        assert other.curv_init == 2.5 and other.traversal_offset == 0.7
        assert other.text_config.hidden_size == TINY_TEXT["hidden_size"]
        assert other.vision_config.patch_size == TINY_VISION["patch_size"]
        assert other.projection_dim == 32
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "hysac" and saved["bounds"]["G"]["up_95"] == TINY_BOUNDS["G"]["up_95"]


@pytest.mark.parametrize(
    "bounds, fragment",
    [
        ({k: v for k, v in TINY_BOUNDS.items() if k != "G"}, "'G'"),
        ({**TINY_BOUNDS, "V": {"avg": 0.5, "up_95": 0.6}}, "V.low_05"),
        ({**TINY_BOUNDS, "S": {"avg": math.nan, "up_95": 0.6, "low_05": 0.1}}, "not a finite distance"),
        ([1, 2], "must be a dict"),
    ],
)
def test_incomplete_or_bad_bounds_are_rejected_with_the_missing_keys(bounds, fragment):
    with pytest.raises(ValueError, match="bounds") as err:
        make_config(bounds=bounds)
    assert fragment in str(err.value)


def test_bad_scalars_and_thresholds_are_rejected():
    with pytest.raises(ValueError, match="curv_init"):
        make_config(curv_init=0.0)
    with pytest.raises(ValueError, match="feature_scale_init"):
        make_config(feature_scale_init=-1.0)
    with pytest.raises(ValueError, match="unknown keys"):
        make_config(unsafe_thresholds={"audio": 1.0})
    with pytest.raises(ValueError, match="not a finite distance"):
        make_config(unsafe_thresholds={"image": float("inf")})


def test_missing_sub_config_fields_fall_back_to_clip_defaults_and_load_from_a_partial_json(tmp_path):
    cfg = make_config()
    data = cfg.to_dict()
    del data["text_config"]["hidden_act"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = HySACConfig.from_pretrained(tmp_path)
    assert loaded.text_config.hidden_act == CLIPTextConfig().hidden_act


def test_max_logit_scale_default_is_the_authors_literal():
    from hysac_hf.modeling.configuration_hysac import MAX_LOGIT_SCALE

    assert MAX_LOGIT_SCALE == 4.6052 and HySACConfig().max_logit_scale == 4.6052
    assert make_config().max_logit_scale != math.log(100)


@pytest.mark.parametrize(
    "stats, fragment",
    [
        ({"up_95": "0.7"}, "bounds['V']['up_95'] = '0.7' (str) is not a number"),
        ({"avg": None}, "bounds['V']['avg'] = None (NoneType) is not a number"),
        ({"low_05": True}, "bounds['V']['low_05'] = True (bool) is not a number"),
        ({"up_95": [0.7]}, "bounds['V']['up_95'] = [0.7] (list) is not a number"),
        ({"avg": math.nan}, "bounds['V']['avg'] = nan is not a finite distance"),
        ({"up_95": math.inf}, "bounds['V']['up_95'] = inf is not a finite distance"),
        ({"low_05": -0.1}, "bounds['V']['low_05'] = -0.1 is not a finite distance >= 0"),
        ({"avg": 0.8}, "bounds['V'] is out of order: low_05 = 0.4, avg = 0.8, up_95 = 0.7"),  # avg > up_95
        ({"low_05": 0.6}, "bounds['V'] is out of order: low_05 = 0.6, avg = 0.55"),  # low_05 > avg
        ({"low_05": 0.7, "up_95": 0.4}, "out of order"),  # swapped percentiles
    ],
)
def test_non_numeric_non_finite_and_inverted_bounds_are_refused_naming_the_key(stats, fragment):
    bounds = {key: dict(values) for key, values in TINY_BOUNDS.items()}
    bounds["V"].update(stats)
    with pytest.raises(ValueError) as err:
        make_config(bounds=bounds)
    assert fragment in str(err.value)


def test_equal_statistics_and_numpy_numbers_are_valid_bounds():
    import numpy as np

    bounds = {key: {stat: np.float32(value) for stat, value in stats.items()} for key, stats in TINY_BOUNDS.items()}
    bounds["S"] = {"avg": 0.3, "up_95": 0.3, "low_05": 0.3}
    cfg = make_config(bounds=bounds)
    assert cfg.bounds["S"] == {"avg": 0.3, "up_95": 0.3, "low_05": 0.3}
    assert all(type(v) is float for stats in cfg.bounds.values() for v in stats.values())


@pytest.mark.parametrize(
    "thresholds, fragment",
    [
        ({"image": "0.9"}, "unsafe_thresholds['image'] = '0.9' (str) is not a number"),
        ({"text": None}, "unsafe_thresholds['text'] = None (NoneType) is not a number"),
        ({"image": math.nan}, "unsafe_thresholds['image'] = nan is not a finite distance"),
        ({"text": -1.0}, "unsafe_thresholds['text'] = -1.0 is not a finite distance >= 0"),
        ({"image": 1.0, "audio": 1.0}, "unknown keys ['audio']"),
    ],
)
def test_bad_unsafe_thresholds_are_refused_naming_the_key(thresholds, fragment):
    with pytest.raises(ValueError) as err:
        make_config(unsafe_thresholds=thresholds)
    assert fragment in str(err.value)


def test_old_config_keys_are_read_under_their_new_names(tmp_path):
    cfg = make_config(alpha_init=0.25, traversal_alpha=0.6)  # keyword arguments of code written before the rename
    assert cfg.feature_scale_init == 0.25 and cfg.traversal_offset == 0.6
    data = make_config().to_dict()
    del data["feature_scale_init"], data["traversal_offset"]
    data.update(alpha_init=0.125, traversal_alpha=0.5)
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = HySACConfig.from_pretrained(tmp_path)
    assert loaded.feature_scale_init == 0.125 and loaded.traversal_offset == 0.5
    assert "alpha_init" not in loaded.to_dict() and "traversal_alpha" not in loaded.to_dict()
    with pytest.raises(ValueError, match="alpha_init is the old name of feature_scale_init"):
        make_config(alpha_init=0.25, feature_scale_init=0.5)
    with pytest.raises(ValueError, match="feature_scale_init"):
        make_config(alpha_init=-1.0)
