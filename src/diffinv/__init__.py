"""diffusion-inversion: synthetic training data from a frozen diffusion model (Zhou, Sahak, Ba 2023).

Stages, each a CLI sub-command and a library entry point:

* ``diffinv invert``     -> :func:`diffinv.diffusion.inversion.invert_dataset`
* ``diffinv generate``   -> :func:`diffinv.diffusion.generation.generate_dataset`
* ``diffinv train``      -> :func:`diffinv.classify.train.train_classifier`
* ``diffinv experiment`` -> :func:`diffinv.experiment.run_study`
* ``diffinv report``     -> :func:`diffinv.report.build.build_report`
"""

__version__ = "0.1.0"
