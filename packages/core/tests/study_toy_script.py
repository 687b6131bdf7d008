"""Runs a toy study; used by the kill-mid-grid test. python study_toy_script.py OUT"""

import sys

from polyfm.core.kit import register_kit
from polyfm.core.studies import StudyConfig, run_study
from polyfm.core.toy import toy_kit

register_kit("toy", toy_kit)
run_study(
    StudyConfig(
        name="toy-study",
        output=sys.argv[1],
        targets=[{"domain": "toy"}],
        sources=["scratch", "pretrained"],
        adaptations=[{"mode": "full"}, {"mode": "linear"}],
        label_fractions=[0.25, 1.0],
        seeds=[0, 1],
        quick=True,
    )
)
