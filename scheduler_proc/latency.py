"""What the scheduler asks of the step cost model (``cost_model.py``): the prefill allowance of
a step under ``target_itl_ms``, and whether a deadline can be met at all.

``running`` below is the scheduler's running list: requests whose one remaining known token
(``len(all_token_ids) - num_computed_tokens == 1``) decodes in the next step.
"""

from __future__ import annotations

from collections.abc import Iterable

from zeroserve.scheduler_proc.admission import AdmissionError
from zeroserve.scheduler_proc.cost_model import StepCostModel, StepShape, TimeBudget
from zeroserve.scheduler_proc.request import Request
from zeroserve.shared.messages import EngineRequest


class LatencyPolicy:
    """The cost model, learned from every measured step whether or not a target is set (the
    deadline check uses it too), and the target it serves."""

    def __init__(self, target_itl_ms: float, min_prefill_tokens: int) -> None:
        self.model = StepCostModel()
        self.target_s = target_itl_ms / 1000.0
        self.min_prefill_tokens = min_prefill_tokens
        self.num_steps_over_target = 0  # steps whose decodes alone were predicted past the target

    def time_budget(self, running: Iterable[Request]) -> TimeBudget | None:
        """The step's prefill allowance: the target less the predicted time of its decodes
        (None: no target, or the model has not seen enough steps yet)."""
        if not self.target_s or not self.model.warmed_up:
            return None
        left = self.target_s - self.model.predict(decode_shape(running))
        if left <= 0:
            self.num_steps_over_target += 1
        return TimeBudget(self.model, left, self.min_prefill_tokens)

    def predicted_service_s(self, req: EngineRequest, running: Iterable[Request]) -> float:
        """The least time ``req`` needs if it started now: its prefill in one step beside the
        running decodes, then one decode step per token that ``min_tokens`` forces (no more: it
        may stop at any token after those)."""
        model, num_prompt = self.model, len(req.prompt_token_ids)
        decodes = decode_shape(running)
        prefill = decodes.copy()
        prefill.add_prefill(0, num_prompt)
        seconds = model.predict(prefill)
        forced = max(req.params.min_tokens, 1) - 1
        if forced:
            decodes.add_decode(num_prompt + forced // 2)
            seconds += forced * model.predict(decodes)
        return seconds

    def check_deadline(self, req: EngineRequest, now: float, running: Iterable[Request]) -> None:
        """429 for a deadline that even a start at ``now`` could not meet (only once the model
        has seen enough steps to say so)."""
        if req.deadline is None or not self.model.warmed_up:
            return
        left = req.deadline - now
        need = self.predicted_service_s(req, running)
        if need > left:
            raise AdmissionError(
                429,
                f"The request cannot meet its deadline: {max(left, 0.0) * 1000:.0f} ms remain, and even "
                f"starting now it needs about {need * 1000:.0f} ms (its prompt and min_tokens at the "
                "engine's measured speed). Allow a later deadline or retry when the engine is less busy.",
                param="deadline_ms",
                code="deadline_infeasible",
            )


def decode_shape(running: Iterable[Request]) -> StepShape:
    """The running requests that decode in the next step (a step of nothing else)."""
    shape = StepShape()
    for r in running:
        if len(r.all_token_ids) - r.num_computed_tokens == 1:
            shape.add_decode(r.num_computed_tokens + 1)
    return shape
