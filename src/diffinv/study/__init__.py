"""Studies: from a user's data to "which synthetic data helps, by how much, with which settings", in one command.

spec    the study file and its candidates (a list value in a settings block is a list of candidates)
plan    every unit of work (a replicate's store, a candidate's set, a classifier run), keyed by what makes it
engine  running the units (in this process, in processes, as shards or on Ray), choosing on validation,
        reading the test split for the kept candidates, the tables and the report
estimate the time of a study's unfinished units on this device, from a probe
experiment, demo   the two study sub-commands (their Stage objects)

Above :mod:`diffinv.stages`: a study drives the stages; no stage imports a study.

Like :mod:`diffinv.stages`, this is orchestration; the library never imports it.
"""
