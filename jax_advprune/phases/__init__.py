"""The four phases of a run, one module each: score, select, train, evaluate.

Each module has `NAME`, `settings(config)` (what decides its outputs, recorded in
settings/<NAME>.json when it starts and compared on a rerun) and `run(...)`, which
skips the phase when its outputs are complete. Where each phase's files are, and
when it is complete (`is_complete`) or begun (`has_outputs`), is `run_dir`'s.
"""
