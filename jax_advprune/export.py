"""Export a trained model as a PyTorch state dict with the reference implementations' keys.

    python -m jax_advprune.export --workdir runs/c10 --weights best_ema --out model.pt        # or model.safetensors

--weights: `best_ema` (the EMA weights of the best-validation checkpoint, what the
papers report), `ema` or `raw` (the final checkpoint). The file loads with
`load_state_dict` into the DM-Improves-AT / RobustBench WideResNet or PreAct
ResNet-18 (jax_advprune/models/torch_keys.py has the keys), or into
`jax_advprune.models.torch_reference` (every model, including the SmallCNN).
The normalisation constants are not part of such state dicts: they are printed.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

WEIGHTS = ("best_ema", "ema", "raw")


def trained_variables(workdir: str, weights: str):
    """(Flax model, variables, checkpoint step) of the train phase's `weights` in `workdir`."""
    import orbax.checkpoint as ocp

    from jax_advprune.errors import UserError
    from jax_advprune.models import create_model
    from jax_advprune.phases.train import best_checkpointer, final_checkpoint_dir
    from jax_advprune.workdir import read_json, settings_path

    if weights not in WEIGHTS:
        raise UserError(f"--weights={weights!r}: one of {', '.join(WEIGHTS)}")
    if not os.path.exists(settings_path(workdir, "train")):
        raise UserError(f"{workdir} holds no trained model ({settings_path(workdir, 'train')} is missing): run the train phase first")
    settings = read_json(settings_path(workdir, "train"))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in settings["model"]["kwargs"].items()}
    model = create_model(settings["model"]["name"], num_classes=settings["data"]["num_classes"], **kwargs)
    ckpt_dir = final_checkpoint_dir(workdir)
    if weights == "best_ema":
        checkpointer = best_checkpointer(ckpt_dir)
        step, ckpt_dir = checkpointer.best_step(), checkpointer.directory
        checkpointer.close()
    else:
        steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []
        step = max(steps) if steps else None
    if step is None:
        raise UserError(f"{workdir} has no {'best-validation ' if weights == 'best_ema' else ''}checkpoint in {ckpt_dir}")
    state = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, str(step), "state"))
    params = state["ema_params"] if weights in ("best_ema", "ema") else state["params"]
    return model, {"params": params, "batch_stats": state["batch_stats"]}, int(step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--weights", default="best_ema", choices=WEIGHTS)
    parser.add_argument("--out", required=True, help="model.pt (torch.save of the state dict) or model.safetensors")
    args = parser.parse_args(argv)
    from jax_advprune.errors import UserError
    from jax_advprune.models.torch_export import save_state_dict
    from jax_advprune.models.torch_keys import state_dict_from_variables

    try:
        model, variables, step = trained_variables(args.workdir, args.weights)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    state = state_dict_from_variables(model, variables)
    save_state_dict(state, args.out)
    print(f"wrote {args.out}: {type(model).__name__} {args.weights} weights of step {step}, {len(state)} tensors, "
          f"{sum(int(np.prod(v.shape)) for v in state.values() if v.dtype != np.int64):,} parameters and statistics; "
          f"inputs in [0, 1] normalised with mean {tuple(model.mean)} and std {tuple(model.std)}")


if __name__ == "__main__":
    main()
