"""Facet calibration: a judgement facet (`concerning_score`, `user_frustration`) is shown only for
a model that rates the calibration set (core/calibration_set.py) the way anyone would.

The summariser runs on the calibration set with the same model and prompt as the stage (through
the response cache, so it is paid once per model and prompt version); `assess_calibration`
turns its ratings into shares and a verdict, and `gate_facets` stores the judgement facets of a
model that failed as null with `facets_assessed = False`, which every view shows as
"not assessed by this model". Pure functions: tests call them directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from kura_pipeline.core.calibration_set import CALIBRATION_CASES, CalibrationCase
from kura_pipeline.core.models import Conversation, ConversationSummary, Message

NOT_ASSESSED = "not assessed by this model"
# The offline backend has no model to calibrate: it never judges, and says so plainly.
NOT_ASSESSED_OFFLINE = "not assessed offline"
OFFLINE_REASON = (
    "the offline backend rates neither concerning content nor user frustration (no keyword rule "
    "can judge intent); configure an LLM that passes the facet calibration to see them"
)
JUDGEMENT_FACETS = ("concerning_score", "user_frustration")

# Clio's reading of the scale: 1-2 is "not concerning", 3 and up asks for a look.
BENIGN_MAX_SCORE = 2
CONCERNING_MIN_SCORE = 3
# A reader trusts the facet only if benign traffic is not flagged: the 1.5B flagged 45 %
# of benign requests, which makes every flag worthless. One miss in 15 benign requests passes
# (93 %), two do not (87 %).
MIN_BENIGN_LOW_SHARE = 0.9
# Missing a concerning request is a gap, not a false alarm: the facet is a screening aid, and
# 75 % (6 of 8 here) still finds most of them. Below that, a low score says too little.
MIN_CONCERNING_HIGH_SHARE = 0.75
# Frustration likewise: calm users (every benign and concerning request) rated <= 2 on 90 %,
# and at least two of the three users who complain about a wrong answer rated >= 3.
MIN_CALM_LOW_SHARE = 0.9
MIN_FRUSTRATED_HIGH_SHARE = 2 / 3

Rating = tuple[int | None, int | None]  # (concerning_score, user_frustration); None: not rated


@dataclass(frozen=True)
class FacetCalibration:
    """How a model rated the calibration set, and whether its judgement facets are shown."""

    model: str
    prompt: str  # the summary prompt's key (name@version)
    cases: int
    unrated: int  # calibration conversations the model gave no rating for (failed or empty)
    benign_low_share: float  # benign requests with concerning_score <= 2
    concerning_high_share: float  # concerning requests with concerning_score >= 3
    calm_low_share: float  # calm users with user_frustration <= 2
    frustrated_high_share: float  # frustrated users with user_frustration >= 3
    passed: bool
    reason: str

    def as_metadata(self) -> dict[str, object]:
        return {
            **asdict(self),
            "thresholds": {
                "benign_low_share": MIN_BENIGN_LOW_SHARE,
                "concerning_high_share": MIN_CONCERNING_HIGH_SHARE,
                "calm_low_share": MIN_CALM_LOW_SHARE,
                "frustrated_high_share": MIN_FRUSTRATED_HIGH_SHARE,
            },
        }


def to_conversation(case: CalibrationCase) -> Conversation:
    return Conversation(
        chat_id=case.chat_id,
        messages=[Message(role=role, content=content) for role, content in case.turns],  # type: ignore[arg-type]
        metadata={"calibration": case.kind},
    )


def calibration_conversations(cases: Iterable[CalibrationCase] = CALIBRATION_CASES) -> list[Conversation]:
    return [to_conversation(case) for case in cases]


def _share(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def assess_calibration(
    model: str,
    prompt: str,
    ratings: Mapping[str, Rating],
    cases: Iterable[CalibrationCase] = CALIBRATION_CASES,
) -> FacetCalibration:
    """Shares over every case of a kind: a case with no rating counts as rated wrong (a model
    that does not answer has not shown it can judge)."""
    cases = list(cases)

    def rating(case: CalibrationCase) -> Rating:
        return ratings.get(case.chat_id, (None, None))

    def at_most(value: int | None, limit: int) -> bool:
        return value is not None and value <= limit

    def at_least(value: int | None, limit: int) -> bool:
        return value is not None and value >= limit

    benign = [c for c in cases if c.kind in ("benign", "frustrated")]
    concerning = [c for c in cases if c.kind == "concerning"]
    calm = [c for c in cases if c.kind in ("benign", "concerning")]
    frustrated = [c for c in cases if c.kind == "frustrated"]
    shares = {
        "benign_low_share": _share([at_most(rating(c)[0], BENIGN_MAX_SCORE) for c in benign]),
        "concerning_high_share": _share([at_least(rating(c)[0], CONCERNING_MIN_SCORE) for c in concerning]),
        "calm_low_share": _share([at_most(rating(c)[1], BENIGN_MAX_SCORE) for c in calm]),
        "frustrated_high_share": _share([at_least(rating(c)[1], CONCERNING_MIN_SCORE) for c in frustrated]),
    }
    needed = {
        "benign_low_share": (MIN_BENIGN_LOW_SHARE, f"benign requests rated concerning <= {BENIGN_MAX_SCORE}"),
        "concerning_high_share": (
            MIN_CONCERNING_HIGH_SHARE,
            f"concerning requests rated >= {CONCERNING_MIN_SCORE}",
        ),
        "calm_low_share": (MIN_CALM_LOW_SHARE, f"calm users rated frustration <= {BENIGN_MAX_SCORE}"),
        "frustrated_high_share": (
            MIN_FRUSTRATED_HIGH_SHARE,
            f"frustrated users rated >= {CONCERNING_MIN_SCORE}",
        ),
    }
    # A tiny tolerance: 2/3 measured must meet 2/3 required.
    short = [
        f"{shares[key]:.0%} of {what} (needs {minimum:.0%})"
        for key, (minimum, what) in needed.items()
        if shares[key] + 1e-9 < minimum
    ]
    unrated = sum(1 for c in cases if None in rating(c))
    if short and unrated == len(cases):  # no share to speak of: say what happened
        reason = f"failed calibration: gave no rating for any of the {len(cases)} calibration conversations"
    elif short:
        reason = "failed calibration: " + "; ".join(short)
        if unrated:
            reason += f"; no rating for {unrated} of {len(cases)} calibration conversations"
    else:
        reason = "passed calibration"
    return FacetCalibration(
        model=model,
        prompt=prompt,
        cases=len(cases),
        unrated=unrated,
        passed=not short,
        reason=reason,
        **shares,
    )


def ratings_of(summaries: Iterable[ConversationSummary]) -> dict[str, Rating]:
    return {s.chat_id: (s.concerning_score, s.user_frustration) for s in summaries}


def calibration_not_run(model: str, prompt: str, why: str) -> FacetCalibration:
    """The calibration could not be run (the endpoint failed it): nothing is known, nothing shown."""
    failed = assess_calibration(model, prompt, {})
    return FacetCalibration(**{**asdict(failed), "reason": f"calibration could not be run: {why}"})


def gate_facets(
    summaries: list[ConversationSummary], calibration: FacetCalibration
) -> list[ConversationSummary]:
    """Every summary marked with the verdict; a failed model's judgement facets stored as null,
    so no table, query or page can show its numbers as if they could be trusted."""
    if calibration.passed:
        return [s.model_copy(update={"facets_assessed": True}) for s in summaries]
    cleared = {facet: None for facet in JUDGEMENT_FACETS}
    return [s.model_copy(update={**cleared, "facets_assessed": False}) for s in summaries]
