"""`--compile`: torch.compile the model's forward and each alignment projector, in place.

`nn.Module.compile()` wraps the module's call and leaves its parameters and state_dict keys as
they are, so checkpoints, the EMA (which stays eager: it only samples) and DDP see the same
modules as in eager mode. Compiled kernels reorder floating-point work, so losses match eager
within a tolerance (tests/test_train_compile.py), not bit for bit; eager mode is unchanged.
"""

from __future__ import annotations

from .state import TrainState


def compile_state(state: TrainState) -> None:
    """Compile the trained modules of `state` (the model and, while alignment runs, the projectors)."""
    state.model.compile()
    if state.head is not None:
        for projector in state.head.projectors.values():
            projector.compile()
