"""``diffinv demo``: the packaged study (``assets/studies/demo.yaml``) through the study engine, offline on a CPU.

Few-shot digits, inverted into the base model shipped with the package; Diffusion Inversion and
img2img variants; the same classifier on real, real + DI and real + img2img over replicates; the
table and the report. Every flag of ``diffinv experiment`` changes it.
"""

from __future__ import annotations

from pathlib import Path

from diffinv.config import StudyConfig
from diffinv.stages import Stage
from diffinv.study.experiment import run, summary
from diffinv.study.plan import ASSETS, EMBEDDED_BASE, embedded_base

DEMO_STUDY = ASSETS / "studies" / "demo.yaml"

__all__ = ["DEMO_STUDY", "EMBEDDED_BASE", "STAGE", "embedded_base"]

STAGE = Stage(name="demo", config=StudyConfig, marker="study.yaml", run=run, summary=summary, path_fields=("data",),
              cli="study", study=str(DEMO_STUDY), default_out="runs/demo",
              usage="diffinv demo [--out DIR] [study flags] [--invert-X V] [--generate-X V[,V...]] ...",
              description=("The packaged study: 2 digits per class into the base model shipped with the package, 8 "
                           "replicates, 10 Diffusion Inversion and 10 img2img variants per image, a seeded classifier "
                           "on real, real + DI and real + img2img; prints mean ± std test accuracy with paired intervals "
                           "and writes a report, in a few minutes on a CPU. Re-running continues an interrupted demo. "
                           f"Its settings: {Path(DEMO_STUDY).name} in the package; every flag below overrides them."))
