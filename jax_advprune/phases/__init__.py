"""The four phases of a run, one module each: score, select, train, evaluate.

Each module has `NAME`, `settings(config)` (what decides its outputs, recorded in
settings/<NAME>.json when it starts and compared on a rerun), `has_outputs(workdir)`
(anything written, complete or not) and `run(...)`, which skips the phase when
its outputs are complete.
"""
