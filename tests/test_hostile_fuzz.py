"""Fuzzed settings: ``lines_config.json`` contents, config fields and ``lines-hf`` argument lists.

Only lines_hf's own errors may come out of the Python API, and the CLI must
exit with status 1 or 2 and print one error line, never a traceback.
"""

import contextlib
import io
import json
import math
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lines_hf import LiNeSConfig, LiNeSEditor, LiNeSError
from lines_hf.checkpoint import parse_shard_size
from lines_hf.cli import main as cli_main
from tiny import make_model, perturb

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FIELDS = [
    "alpha", "beta", "gamma", "non_block_scale", "stack_policy", "layer_pattern", "num_layers", "exclude",
    "out_dtype", "allow_missing_tensors", "allow_non_finite", "new_vocab_rows",
]

# JSON values of every type, including the ones Python's json module accepts beyond the standard.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["alpha", "keep", "base", "per_stack", "global", "float32", "error", "finetuned", "nan",
                     "1e400", r"^bert\.encoder\.layer\.(\d+)\.", "(", "a{99999999999}", r"(?P<index>\d+)"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
config_dicts = st.dictionaries(st.sampled_from(FIELDS + ["resolved", "unknown_key"]), json_values, max_size=6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = make_model("bert")
    base.save_pretrained(root / "base")
    perturb(base).save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


@FUZZ
@given(data=config_dicts)
def test_config_fields_raise_only_config_errors(data):
    try:
        config = LiNeSConfig.from_dict(data)
    except LiNeSError as exc:
        assert isinstance(exc, ValueError)
        return
    # Whatever was accepted is finite and survives a JSON round trip unchanged.
    for name in ("alpha", "beta", "gamma"):
        value = getattr(config, name)
        assert value is None or math.isfinite(value)
    assert LiNeSConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@FUZZ
@given(data=config_dicts)
def test_fuzzed_config_plan_raises_only_lines_errors(pair, data):
    base_dir, tuned_dir = pair
    try:
        plan = LiNeSEditor.plan(tuned_dir, base_dir, config=LiNeSConfig.from_dict(data))
    except LiNeSError:
        return
    assert len(plan.actions) == 39


@FUZZ
@given(text=st.one_of(
    json_values.map(json.dumps),
    config_dicts.map(lambda d: json.dumps(d)),
    st.text(max_size=40),
    st.sampled_from(["[" * 20_000, '{"alpha": NaN, "beta": Infinity}', '{"alpha": 1' + "0" * 5000 + "}",
                     '{"alpha": 1e999, "beta": -1e999}', "\ufeff{}", '{"num_layers": {"a": 0}}']),
))
def test_config_file_raises_only_config_errors(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("config")
    (folder / "lines_config.json").write_text(text, encoding="utf-8")
    try:
        LiNeSConfig.from_pretrained(folder)
    except LiNeSError as exc:
        assert str(folder) in str(exc)


@FUZZ
@given(value=st.one_of(st.integers(), st.text(max_size=10), st.floats(), st.none(), st.booleans()))
def test_shard_size_parses_or_raises_config_error(value):
    try:
        size = parse_shard_size(value)
    except LiNeSError as exc:
        assert repr(value) in str(exc)
        return
    assert isinstance(size, int)
    assert size > 0


# --------------------------------------------------------------------------- the command line

OPTIONS = [
    "--alpha", "--beta", "--gamma", "--non-block-scale", "--stack-policy", "--layer-pattern", "--num-layers",
    "--exclude", "--out-dtype", "--allow-missing-tensors", "--allow-non-finite", "--new-vocab-rows", "--config",
    "--overwrite", "--max-shard-size", "--allow-pickle", "--trust-remote-code", "--revision", "--base-revision",
    "--adapter", "--merge", "--debug-not-an-option", "--no-progress",
]
VALUES = ["0.3", "-1", "nan", "inf", "1e400", "abc", "", "0", "3", "keep", "global", "float16", "finetuned",
          "encoder=2", "=", "(", r"^bert\.encoder\.layer\.(\d+)\.", "5GB", "garbage", "-5GB", "\x00", "--"]


def run_cli(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli_main(argv)
        except SystemExit as exc:  # argparse exits for usage errors and --help
            code = exc.code
    return code, err.getvalue()


@FUZZ
@given(
    words=st.lists(st.one_of(st.sampled_from(OPTIONS), st.sampled_from(VALUES), st.text(max_size=6)), max_size=8),
    base_first=st.booleans(),
)
def test_cli_fuzzed_arguments_print_one_error(pair, tmp_path_factory, words, base_first):
    base_dir, tuned_dir = pair
    outputs = tmp_path_factory.mktemp("cli")
    required = ["--base", str(base_dir), "--finetuned", str(tuned_dir), "--output", str(outputs / "out"), "--dry-run"]
    argv = ["edit", *(required + words if base_first else words + required)]
    code, err = run_cli(argv)

    assert "Traceback" not in err
    if code == 0:
        return
    assert code in (1, 2)
    errors = [line for line in err.splitlines() if line.startswith("lines-hf")]
    assert len(errors) == 1
    assert "error: " in errors[0]
    assert err.rstrip("\n").splitlines()[-1] == errors[0]
    assert not (outputs / "out").exists()
    shutil.rmtree(outputs)


@FUZZ
@given(data=config_dicts)
def test_cli_fuzzed_config_file(pair, tmp_path_factory, data):
    base_dir, tuned_dir = pair
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "lines_config.json").write_text(json.dumps(data))
    code, err = run_cli(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--output",
                         str(folder / "out"), "--config", str(folder / "lines_config.json"), "--dry-run"])
    assert "Traceback" not in err
    assert code in (0, 1)
    if code == 1:
        errors = [line for line in err.splitlines() if line.startswith("lines-hf")]
        assert len(errors) == 1
        assert errors[0].startswith("lines-hf: error: ")
