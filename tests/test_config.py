import json
import math

import pytest

from lines_hf import ConfigError, LiNeSConfig


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"alpha": math.nan, "beta": 0.5}, "alpha"),
        ({"alpha": 0.1, "beta": math.inf}, "beta"),
        ({"gamma": 1.5}, "gamma"),
        ({"alpha": "0.1", "beta": 0.5}, "alpha"),
        ({"non_block_scale": "sometimes"}, "non_block_scale"),
        ({"stack_policy": "sideways"}, "stack_policy"),
        ({"layer_pattern": "layers\\.\\d+"}, "layer_pattern"),
        ({"layer_pattern": "(unclosed"}, "layer_pattern"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_layers": {"model.layers": -2}}, "num_layers"),
        ({"exclude": ["("]}, "exclude"),
        ({"out_dtype": "int8"}, "out_dtype"),
        ({"gamma": 0.3, "alpha": 0.5, "beta": 0.5}, "gamma"),
    ],
)
def test_invalid_field_named(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LiNeSConfig(**kwargs)


def test_gamma_expands():
    assert LiNeSConfig(gamma=0.3).resolved_alpha_beta() == (0.3, pytest.approx(0.7))
    assert LiNeSConfig(gamma=0.3, alpha=0.3, beta=0.7).resolved_alpha_beta() == (0.3, pytest.approx(0.7))


def test_missing_alpha_beta():
    with pytest.raises(ConfigError, match="beta is not set"):
        LiNeSConfig(alpha=0.5).resolved_alpha_beta()
    with pytest.raises(ConfigError, match="alpha is not set"):
        LiNeSConfig(beta=0.5).resolved_alpha_beta()
    assert LiNeSConfig(beta=0.5).resolved_alpha_beta(allow_auto_alpha=True) == (None, 0.5)


def test_numeric_non_block_policy_string():
    assert LiNeSConfig(alpha=0, beta=1, non_block_scale="0.25").non_block_scale == 0.25


def test_round_trip(tmp_path):
    config = LiNeSConfig(alpha=0.2, beta=0.7, exclude=["lm_head"], num_layers={"encoder.block": 3}, out_dtype="bfloat16")
    path = config.save_pretrained(tmp_path, resolved={"alpha": 0.2})
    data = json.loads(open(path).read())
    assert data["resolved"] == {"alpha": 0.2}
    assert "lines_hf_version" in data
    assert LiNeSConfig.from_pretrained(tmp_path) == config


def test_invalid_json(tmp_path):
    (tmp_path / "lines_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LiNeSConfig.from_pretrained(tmp_path)
