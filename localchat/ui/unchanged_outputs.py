"""Outputs an event leaves as they are cost the server nothing.

A handler updates some of its event's outputs and leaves the others out of its dict (or gives
`gr.skip()`). Gradio 6 turns each left-out output into an update without properties, and its
postprocessing then builds a new component from the old one's arguments and computes that component's
config twice, for an update that changes nothing: the page ignores an update without properties. A
reply's first update names 3 of its event's 11 outputs, so it spent ~30 ms there while the engine held
both cores, and the page waited for it (benchmarks/NOTES.md session 15).

`skip_unchanged(demo)` has the demo's postprocessing pass such outputs through as they are and process
only the others. State outputs always take Gradio's own path, which keeps their values on the server.
When Gradio lacks what this relies on, postprocessing is left as it is.
"""

from __future__ import annotations

from copy import copy

UNCHANGED = {"__type__": "update"}  # what gr.skip() and a left-out output become


def _unchanged(value, block) -> bool:
    return isinstance(value, dict) and value == UNCHANGED and not getattr(block, "stateful", False)


def skip_unchanged(demo) -> bool:
    """Patch `demo` (a gr.Blocks) so that outputs left unchanged skip postprocessing; returns whether it could."""
    try:
        from gradio.blocks import convert_component_dict_to_list
    except ImportError:
        return False
    original = getattr(demo, "postprocess_data", None)
    if original is None:
        return False

    async def postprocess_data(block_fn, predictions, state):
        outputs = list(getattr(block_fn, "outputs", None) or [])
        if len(outputs) < 2 or getattr(block_fn, "batch", True) or getattr(block_fn, "is_validator_function", True):
            return await original(block_fn, predictions, state)
        if isinstance(predictions, dict) and predictions == UNCHANGED:
            predictions = [dict(UNCHANGED) for _ in outputs]
        elif isinstance(predictions, dict) and predictions:
            predictions = convert_component_dict_to_list(outputs, predictions)
        if not isinstance(predictions, (list, tuple)) or len(predictions) != len(outputs):
            return await original(block_fn, predictions, state)  # Gradio says what is wrong with them
        changed = [i for i, (value, block) in enumerate(zip(predictions, outputs)) if not _unchanged(value, block)]
        if len(changed) == len(outputs):
            return await original(block_fn, predictions, state)
        result = [dict(UNCHANGED) for _ in outputs]
        if changed:
            part = copy(block_fn)
            part.outputs = [outputs[i] for i in changed]
            values = [predictions[i] for i in changed]
            done = await original(part, values if len(changed) > 1 else values[0], state)
            for i, value in zip(changed, done):
                result[i] = value
        return result

    demo.postprocess_data = postprocess_data
    return True
