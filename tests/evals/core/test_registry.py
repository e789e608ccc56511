"""Each suite package registers itself once; the shared code (compare, regress) finds it there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from evals.core import registry
from evals.core.settings import SuiteSettings


def test_every_suite_package_registers_itself():
    suites = registry.suites()
    assert set(suites) == {"needle", "lost_in_middle"}
    for name, record in suites.items():
        assert record.name == name and record.command == f"python -m evals.{name}"
        assert registry.get(name) is record
    assert registry.get("nope") is None


def test_a_suite_registered_twice_is_refused():
    record = registry.get("needle")
    assert registry.register(record) is record  # the same record again (a re-import) is fine
    clone = registry.SuiteRecord("needle", "python -m elsewhere", record.layout, record.load)
    with pytest.raises(ValueError, match="'needle' is registered twice"):
        registry.register(clone)


def test_looking_up_a_suite_loads_no_model_code():
    """compare reads a suite's layout without importing torch; the settings and execute come on first use."""
    code = ("import sys; from evals.core import registry; r = registry.suites(); "
            "print('torch' in sys.modules, sorted(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split(maxsplit=1) == ["False", "['lost_in_middle', 'needle']\n"]


def test_a_records_code_is_the_suites_own():
    from evals.lost_in_middle import report as litm_report
    from evals.lost_in_middle.suite import LitmSettings
    from evals.needle import report as needle_report
    from evals.needle.suite import NeedleSettings, execute

    needle, litm = registry.get("needle").code, registry.get("lost_in_middle").code
    assert needle.settings is NeedleSettings and needle.execute is execute
    assert needle.write_report is needle_report.write_needle_report
    assert litm.settings is LitmSettings and litm.write_report is litm_report.write_report
    assert issubclass(litm.settings, SuiteSettings)
