"""The adverse-action notice of a decision (Regulation B, 12 CFR 1002.9), from its record.

The statement of principal reasons is the stored record's reasons, in rank order, by their
texts only: a reason names a reason family, never a feature, and the schema refuses a family
holding a protected attribute, so no notice can name one. Nothing is recomputed: a notice
printed in seven years says what the record said on the day.
"""

from dataclasses import dataclass
from datetime import date

from service.core.records import BinaryPrediction, DecisionRecord

# Regulation B, 12 CFR 1002.9(b)(1): the ECOA notice every adverse-action notice carries.
ECOA_NOTICE = (
    "The Federal Equal Credit Opportunity Act prohibits creditors from discriminating against "
    "credit applicants on the basis of race, color, religion, national origin, sex, marital "
    "status, age (provided the applicant has the capacity to enter into a binding contract); "
    "because all or part of the applicant's income derives from any public assistance "
    "program; or because the applicant has in good faith exercised any right under the "
    "Consumer Credit Protection Act. The Federal agency that administers compliance with this "
    "law concerning this creditor is named below."
)


@dataclass(frozen=True, slots=True)
class Lender:
    name: str
    address: str
    regulator: str


@dataclass(frozen=True, slots=True)
class Notice:
    """What the letter says; `reasons` is empty, and `adverse` False, for an approval."""

    transaction_id: str
    decided_on: date
    adverse: bool
    reasons: tuple[str, ...]
    lender: Lender
    ecoa_notice: str = ECOA_NOTICE


def is_adverse(record: DecisionRecord) -> bool:
    """A denial: only binary credit decisions deny (regression and multiclass outputs do not)."""
    prediction = record.prediction
    return isinstance(prediction, BinaryPrediction) and prediction.decision == "deny"


def notice(record: DecisionRecord, lender: Lender) -> Notice:
    """The notice of `record`: its principal reasons when it is a denial."""
    adverse = is_adverse(record)
    return Notice(
        transaction_id=record.transaction_id,
        decided_on=record.decided_at.date(),
        adverse=adverse,
        reasons=tuple(reason.reason for reason in record.reasons) if adverse else (),
        lender=lender,
    )
