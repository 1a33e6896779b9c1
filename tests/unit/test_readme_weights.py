"""The README's table of compromise-detection signals is scoring.risk.WEIGHTS, exactly."""

import re
from pathlib import Path

from scoring import risk

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_weights() -> dict[str, float]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Compromise detection"):]
    section = section[:section.index("\n## ")]
    return {name: float(weight) for name, weight in
            re.findall(r"^\| `(\w+)` \| ([0-9.]+) \|", section, re.M)}


def test_the_readme_table_has_every_signal_with_its_weight():
    assert readme_weights() == risk.WEIGHTS


def test_the_readme_names_the_default_thresholds():
    section = README.read_text(encoding="utf-8")
    defaults = risk.Settings()
    for rung, value in (("Throttle", defaults.throttle_at), ("Hold", defaults.hold_at),
                        ("Lock", defaults.lock_at)):
        assert f"**{rung}** (default {value:g})" in section
    assert f"throttle rate ({defaults.throttle_rate})" in section
