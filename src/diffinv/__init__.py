"""diffusion-inversion: synthetic training data from a frozen diffusion model (Zhou, Sahak, Ba 2023).

Stages, each a CLI sub-command (:mod:`diffinv.launch` runs them by name) and a library entry point:

* ``diffinv invert``     -> :func:`diffinv.stages.invert.invert_dataset`
* ``diffinv generate``   -> :func:`diffinv.stages.generate.generate_dataset`
* ``diffinv train``      -> :func:`diffinv.stages.train.train_classifier`
* ``diffinv experiment`` -> :func:`diffinv.study.engine.run_study` (``diffinv demo``: the packaged study)
* ``diffinv report``     -> :func:`diffinv.report.build.build_report`
"""

__version__ = "0.1.0"
