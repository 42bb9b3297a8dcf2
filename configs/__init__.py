"""The shipped configs, importable so that a config builds on another (`from configs import default`), as a config
of one's own can: `get_config(variant)` returns an ml_collections ConfigDict. The command line loads them by path:
`--config configs/<x>.py[:variant]`."""
