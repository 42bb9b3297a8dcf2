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
import sys

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--weights", default="best_ema", choices=("best_ema", "ema", "raw"))
    parser.add_argument("--out", required=True, help="model.pt (torch.save of the state dict) or model.safetensors")
    args = parser.parse_args(argv)
    from jax_advprune.errors import UserError
    from jax_advprune.models.torch_export import save_state_dict
    from jax_advprune.models.torch_keys import state_dict_from_variables
    from jax_advprune.phases.weights import build_saved_model, saved_variables

    try:
        settings, variables, step = saved_variables(args.workdir, args.weights)
        model = build_saved_model(settings)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    state = state_dict_from_variables(model, variables)
    save_state_dict(state, args.out)
    print(
        f"wrote {args.out}: {type(model).__name__} {args.weights} weights of step {step}, {len(state)} tensors, "
        f"{sum(int(np.prod(v.shape)) for v in state.values() if v.dtype != np.int64):,} parameters and statistics; "
        f"inputs in [0, 1] normalised with mean {tuple(model.mean)} and std {tuple(model.std)}"
    )


if __name__ == "__main__":
    main()
