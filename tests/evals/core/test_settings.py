"""Typed settings: unknown keys and bad values name the setting and the valid ones, from flags, files and Python."""

from __future__ import annotations

import pytest

from evals.core.errors import SettingsError
from evals.lost_in_middle.suite import LitmSettings
from evals.lost_in_middle.suite import main as litm_main
from evals.needle.suite import NeedleSettings


def test_unknown_key_names_it_and_the_valid_ones():
    with pytest.raises(SettingsError, match=r"unknown needle settings \['lenghts'\]; valid: \[.*'lengths'.*\]"):
        NeedleSettings(lenghts="1k")
    with pytest.raises(SettingsError, match=r"unknown lost_in_middle settings \['doc'\]; valid: \[.*'docs'.*\]"):
        LitmSettings(doc=10)


def test_wrong_type_names_the_setting_and_the_value():
    with pytest.raises(SettingsError, match=r"--top-k: Input should be a valid integer.*\(got 'four'\)"):
        NeedleSettings(lengths="1k", top_k="four")
    with pytest.raises(SettingsError, match=r"--lengths is required"):
        NeedleSettings()


def test_a_suite_file_with_an_unknown_key_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("docs: 10\nkv_pair: 3\n")
    assert litm_main(["--config", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown settings ['kv_pair']" in err and "'kv_pairs'" in err


def test_each_default_is_written_once_on_the_model():
    assert NeedleSettings.model_fields["top_k"].default == 4 and NeedleSettings(lengths="1k").top_k == 4
    assert LitmSettings().docs == (10, 20)


def test_invalid_comparison_is_an_eval_error():
    from evals.core.compare import InvalidComparison
    from evals.core.errors import EvalError

    assert issubclass(InvalidComparison, EvalError)


def test_settings_added_by_features_are_typed_fields():
    """adapter, scorer and haystack genres are fields of the models: checked, and hashed as before they existed."""
    s = NeedleSettings(lengths="1k", haystack=["docs", "novels"], scorer="lenient")
    assert s.haystack == ("docs", "novels") and list(s.genres) == ["docs", "novels"]
    assert "scorer" not in s.hashed() and "adapter" not in s.hashed()  # run control / no adapter: hash unchanged
    assert NeedleSettings(lengths="1k", adapter=None).adapter == ()
    with pytest.raises(SettingsError, match=r"--adapter: Input should be a valid tuple.*\(got 3\)"):
        NeedleSettings(lengths="1k", adapter=3)
    with pytest.raises(SettingsError, match=r"--scorer 'fuzzy' is unknown"):
        LitmSettings(scorer="fuzzy")
    with pytest.raises(SettingsError, match=r"unknown lost_in_middle settings \['genre'\]"):
        LitmSettings(genre="docs")
