"""diffusion-inversion: synthetic training data from a frozen diffusion model (Zhou, Sahak, Ba 2023).

Stages, each a CLI sub-command and a library entry point:

* ``diffinv invert``  -> :func:`diffinv.diffusion.inversion.invert_dataset`
"""

__version__ = "0.1.0"
