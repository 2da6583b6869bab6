"""What the README claims about the demo agrees with the config and the measured run it cites.

The figures come from ``bench/results/demo/results.json`` (a copy of ``runs/demo/results.json``
of the run the README reports); refreshing them without the README's sentences fails here.
The Usage blocks themselves run in ``tests/test_demo.py`` after a quick demo.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
sys.path.insert(0, str(REPO / "scripts"))

import demo  # noqa: E402  (scripts/demo.py)

USAGE_BLOCK = re.compile(r"<!-- usage-test -->\n```bash\n(.*?)```", re.S)


def usage_commands(text: str = README) -> list[str]:
    """The commands of the README's ``usage-test`` blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in USAGE_BLOCK.findall(text):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_demo_counts_match_the_config():
    full = demo.load_config(demo.DemoConfig, REPO / "configs" / "demo" / "full.yaml")
    counts = demo.run_counts(full)                      # "8 student runs (5 recipes, 3 of them with 2 seeds)"
    assert f"trains {counts}" in README, counts
    saved = demo.DemoConfig.from_dict(json.loads((REPO / "bench/results/demo/results.json").read_text())["config"])
    assert demo.run_counts(saved) == counts             # the reported run ran this config's runs


def test_demo_time_claims_match_the_measured_run():
    seconds = json.loads((REPO / "bench/results/demo/results.json").read_text())["demo_seconds"]
    assert f"whole demo {seconds:.0f} s ({seconds / 60:.1f} min)" in README
    claim = re.search(r"bash scripts/demo\.sh +# .*?~(\d+) min", README)
    assert claim and int(claim.group(1)) == round(seconds / 60), (claim and claim.group(0), seconds)


def test_usage_blocks_name_configs_that_exist():
    commands = usage_commands()
    assert len(commands) >= 8 and any("student.train" in c for c in commands)
    for cmd in commands:
        for ref in re.findall(r"configs/[\w/.-]+\.yaml", cmd):
            assert (REPO / ref).exists(), (cmd, ref)
