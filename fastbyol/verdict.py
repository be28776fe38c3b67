"""Which side sets the pace, named from three rates: the profiler's verdict rules, as a pure function.

Used by `fastbyol profile` (measured rates) and by the training summary (rates estimated from
the run's loader wait, see train.py's `where_time_went`).
"""

from __future__ import annotations

# Thresholds on source images/sec ratios; see `verdict`.
HIDES_WELL = 0.97  # end-to-end / model-only at or above this: the loader is hidden (DESIGN.md's goal)
LOSES_MUCH = 0.90  # end-to-end / model-only below this: the pipeline costs more than 10 %
HEADROOM = 1.20  # loader-only / model-only at or above this: the loader comfortably outruns the model

VERDICTS = ("loader-bound", "model-bound", "contention", "balanced")


def verdict(loader: float, model: float, end_to_end: float) -> tuple[str, list[str]]:
    """The bottleneck named from three rates (images/sec), with the evidence: a pure function.

    Rules, with L = loader-only, M = model-only, E = end-to-end (first match wins):
      loader-bound  L < M (the loader alone cannot feed the model), or E/M < LOSES_MUCH and
                    L < HEADROOM·M (the pipeline costs > 10 % and the loader has no headroom);
      model-bound   L >= HEADROOM·M and E/M >= HIDES_WELL (the loader outruns the model and hides);
      contention    L >= HEADROOM·M but E/M < HIDES_WELL: the loader is fast alone, so the loss is not
                    its speed but what it shares with the step: its workers take CPU cores the step
                    needs (all of them when the step runs on the CPU), or a per-batch host-to-device
                    copy or host sync stalls the step;
      balanced      otherwise: HEADROOM·M > L >= M and E/M >= LOSES_MUCH (the loader just keeps up).
    """
    lm, em = loader / model, end_to_end / model
    facts = [f"loader-only / model-only = {lm:.2f} (headroom: >= {HEADROOM:.2f})",
             f"end-to-end / model-only = {em:.2f} (hidden: >= {HIDES_WELL:.2f}; costly: < {LOSES_MUCH:.2f})"]
    if lm < 1.0:
        return "loader-bound", facts + [f"the loader alone delivers {loader:.1f} images/sec, less than the "
                                        f"{model:.1f} the model step consumes"]
    if em < LOSES_MUCH and lm < HEADROOM:
        return "loader-bound", facts + [f"end-to-end loses {100 * (1 - em):.0f} % of the model-only speed and the "
                                        f"loader has under {100 * (HEADROOM - 1):.0f} % headroom"]
    if lm >= HEADROOM and em >= HIDES_WELL:
        return "model-bound", facts + ["the loader outruns the model and hides behind it: speed up the step"]
    if lm >= HEADROOM:
        return "contention", facts + [
            f"the loader alone is {lm:.1f}x faster than the model, yet end-to-end loses {100 * (1 - em):.0f} %: "
            "not a slow loader but a shared resource: its workers take CPU cores the step needs, or a "
            "per-batch host-to-device copy or host sync stalls the step (see the trace: --trace)"]
    return "balanced", facts + ["the loader only just keeps up with the model: both sides set the pace"]


__all__ = ["HEADROOM", "HIDES_WELL", "LOSES_MUCH", "VERDICTS", "verdict"]
