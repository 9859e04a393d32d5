"""The shipped demo: a credit-risk model trained on the Statlog German Credit data."""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import xgboost as xgb
from numpy.typing import NDArray

from service.core.schema import (
    DecisionRule,
    Feature,
    FeatureType,
    ModelSchema,
    ReasonFamily,
    Task,
)
from service.tools.model_init import MODEL_FILES, write_model_dir

DEMO_NAME = "german-credit"
TARGET = "creditability"
SEED = 20240917
HOLDOUT_FRACTION = 0.2

# Plain parameters: one thread and a fixed seed make training reproduce byte for byte.
PARAMS: dict[str, object] = {
    "objective": "binary:logistic",
    "tree_method": "hist",
    "max_depth": 4,
    "eta": 0.05,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "min_child_weight": 2,
    "max_cat_to_onehot": 1,
    "nthread": 1,
    "seed": SEED,
}
ROUNDS = 200


@dataclass(frozen=True)
class _Numeric:
    description: str
    minimum: float
    maximum: float
    # +1: the risk of bad credit may only rise with the value. Set only where lending
    # practice agrees, so an adverse-action reason never reads "too little debt".
    monotone: Literal[-1, 0, 1] = 0


_NUMERIC: dict[str, _Numeric] = {
    # Longer loans carry more time to default and more uncertainty.
    "duration_in_month": _Numeric("Duration of the credit in months", 1, 120, 1),
    # Larger loans are a larger exposure; the data's bump at the smallest amounts follows
    # purpose (small consumer loans) more than the amount itself.
    "credit_amount": _Numeric("Credit amount in Deutsche Mark", 1, 250_000, 1),
    # A larger share of disposable income paid in installments leaves less slack
    # (codebook scale 1 to 4; the bad rate also rises with it in the data).
    "installment_rate_in_percentage_of_disposable_income": _Numeric(
        "Installment rate in percentage of disposable income (codebook scale 1 to 4)", 1, 4, 1
    ),
    # No agreed direction: stability vs. age of the applicant, left free.
    "present_residence_since": _Numeric("Present residence since (codebook scale 1 to 4)", 1, 4),
    # Protected attribute: never constrained, never a reason.
    "age_in_years": _Numeric("Age in years", 18, 100),
    # More credits can mean a proven record or more debt: left free.
    "number_of_existing_credits_at_this_bank": _Numeric(
        "Number of existing credits at this bank", 1, 20
    ),
    "number_of_people_being_liable_to_provide_maintenance_for": _Numeric(
        "Number of people the applicant is liable to provide maintenance for", 0, 20
    ),
}

_DESCRIPTIONS: dict[str, str] = {
    "status_of_existing_checking_account": "Status of the existing checking account",
    "credit_history": "Credit history",
    "purpose": "Purpose of the credit",
    "savings_account_and_bonds": "Savings account and bonds",
    "present_employment_since": "Present employment since",
    "personal_status_and_sex": "Personal status and sex",
    "other_debtors_or_guarantors": "Other debtors or guarantors",
    "property": "Most valuable property",
    "other_installment_plans": "Other installment plans",
    "housing": "Housing",
    "job": "Job",
    "telephone": "Telephone",
    "foreign_worker": "Foreign worker",
}

# Protected under ECOA / Regulation B and the EU AI Act: reported, never a reason.
PROTECTED = frozenset({"personal_status_and_sex", "age_in_years", "foreign_worker"})

# Reason families and the text an adverse-action notice gives, worded after Regulation B's
# sample notice (12 CFR 1002, appendix C) where one fits. A family only appears as a reason
# when its features pushed toward denial, so a directional text ("is long") is used only for
# features constrained to raise the risk as they grow; the others name the factor plainly.
# The second text is for what the applicant did not provide (null) and the model held against
# them: Regulation B's "incomplete application", said of the family. Families of required
# features only have none: their values are never missing.
REASON_FAMILIES: dict[str, tuple[str, str | None]] = {
    "checking": ("Status of checking account", "Checking account information not provided"),
    "duration": ("Duration of credit is long", None),
    "history": ("Credit history", None),
    "purpose": ("Purpose of credit", None),
    "amount": ("Credit amount is high", None),
    "savings": ("Insufficient savings", "Savings information not provided"),
    "employment": ("Length or type of employment", "Employment information not provided"),
    "payment_to_income": ("Installment payments are high in relation to income", None),
    "guarantors": (
        "Co-applicant or guarantor status",
        "Co-applicant or guarantor information not provided",
    ),
    "residence": (
        "Length of residence or housing status",
        "Residence or housing information not provided",
    ),
    "collateral": (
        "Value or type of collateral not sufficient",
        "Collateral information not provided",
    ),
    "other_credit": (
        "Other existing credit obligations",
        "Information on other credit obligations not provided",
    ),
    "dependents": ("Number of dependents", "Number of dependents not provided"),
    "telephone": ("Telephone listing", "Telephone listing not provided"),
}

# What a lender needs to decide at all; every other feature may be null (not provided).
# - The credit applied for: amount, duration and purpose. Without them there is no
#   application to decide, only a form to send back.
# - Its affordability: the installment as a share of disposable income. A creditworthiness
#   assessment (Consumer Credit Directive art. 8, BGB 505a) cannot be made without income.
# - The credit record: the history (from the credit bureau; "no credits taken" is a value of
#   its own, so it is never unknown) and the credits held at this bank (the bank's own books).
# Protected attributes are never required: Regulation B (12 CFR 1002.5) restricts asking for
# sex and marital status, and a model must decide without what it may not give as a reason.
REQUIRED = frozenset(
    {
        "credit_amount",
        "duration_in_month",
        "purpose",
        "installment_rate_in_percentage_of_disposable_income",
        "credit_history",
        "number_of_existing_credits_at_this_bank",
    }
)

FAMILY_OF: dict[str, str] = {
    "status_of_existing_checking_account": "checking",
    "duration_in_month": "duration",
    "credit_history": "history",
    "purpose": "purpose",
    "credit_amount": "amount",
    "savings_account_and_bonds": "savings",
    # Tenure and kind of occupation both speak to the stability of income.
    "present_employment_since": "employment",
    "job": "employment",
    # Already a payment-to-income ratio: Regulation B's "excessive obligations in relation
    # to income", distinct from the size of the loan.
    "installment_rate_in_percentage_of_disposable_income": "payment_to_income",
    "other_debtors_or_guarantors": "guarantors",
    "present_residence_since": "residence",
    "housing": "residence",
    "property": "collateral",
    # Credit taken elsewhere and credits already held here are obligations besides this one.
    "other_installment_plans": "other_credit",
    "number_of_existing_credits_at_this_bank": "other_credit",
    "number_of_people_being_liable_to_provide_maintenance_for": "dependents",
    "telephone": "telephone",
}

# UCI's cost matrix for this data prices granting a bad risk at five times refusing a good
# one, which puts the cost-optimal cut at 1/6 and denies about half of the applicants (a
# lender's business choice, not a demo's); the demo denies when "bad" is the likelier outcome.
DENY_AT_OR_ABOVE = 0.5


def read_german_credit(csv_path: Path) -> tuple[pd.DataFrame, NDArray[np.int8]]:
    """Features (text columns as categories, sorted) and target (1 = bad credit risk)."""
    frame = pd.read_csv(csv_path)
    y = (frame.pop(TARGET) == "bad").to_numpy(dtype=np.int8)
    for column in frame.columns:
        if column not in _NUMERIC:
            # pandas 3 reads text as `str`, which XGBoost rejects; a sorted category list
            # fixes the codes the booster learns.
            labels = sorted(frame[column].dropna().unique())
            frame[column] = pd.Categorical(frame[column], categories=labels)
    return frame, y


def holdout_split(y: NDArray[np.int8], seed: int = SEED) -> tuple[NDArray[np.intp], ...]:
    """Stratified (train, test) row indices, the same for the same seed."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in (0, 1):
        rows = rng.permutation(np.flatnonzero(y == label))
        cut = round(len(rows) * HOLDOUT_FRACTION)
        test.append(rows[:cut])
        train.append(rows[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def auc(y: NDArray[np.int8], score: NDArray[np.floating]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    ranks = pd.Series(score).rank(method="average").to_numpy()
    positives = int(y.sum())
    negatives = len(y) - positives
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


# How the schema's description names the framework a demo was trained with.
_FRAMEWORK_NAMES = {"xgboost": "XGBoost", "lightgbm": "LightGBM"}


def monotone_constraints(columns: Iterable[str]) -> tuple[int, ...]:
    """Each column's monotone direction (+1: the risk may only rise with it; 0: free)."""
    return tuple(_NUMERIC[c].monotone if c in _NUMERIC else 0 for c in columns)


def demo_schema(
    frame: pd.DataFrame,
    holdout_auc: float,
    *,
    name: str = DEMO_NAME,
    framework: str = "xgboost",
) -> ModelSchema:
    """The demo model's schema: ranges, constraints, reason families and protected attributes."""
    features = []
    for column in frame.columns:
        numeric = _NUMERIC.get(column)
        if numeric is None:
            feature = Feature(
                name=column,
                type=FeatureType.CATEGORICAL,
                categories=tuple(frame[column].cat.categories),
                nullable=column not in REQUIRED,
                description=_DESCRIPTIONS[column],
                family=FAMILY_OF.get(column),
                protected=column in PROTECTED,
            )
        else:
            feature = Feature(
                name=column,
                type=FeatureType.NUMERIC,
                minimum=numeric.minimum,
                maximum=numeric.maximum,
                monotone=numeric.monotone,
                nullable=column not in REQUIRED,
                description=numeric.description,
                family=FAMILY_OF.get(column),
                protected=column in PROTECTED,
            )
        features.append(feature)
    return ModelSchema(
        name=name,
        task=Task.BINARY,
        model_file=MODEL_FILES[framework],
        features=tuple(features),
        decision=DecisionRule(
            positive_class="bad", negative_class="good", deny_at_or_above=DENY_AT_OR_ABOVE
        ),
        description=(
            "Probability that a credit applicant is a bad credit risk. "
            f"{_FRAMEWORK_NAMES[framework]} on the Statlog German Credit Data (UCI id 144, Hans "
            "Hofmann, University of Hamburg, CC BY 4.0); "
            f"held-out AUC {holdout_auc:.3f} on {HOLDOUT_FRACTION:.0%} of the applicants. "
            "Required (not nullable): the credit applied for (amount, duration, purpose), its "
            "installment rate (no creditworthiness assessment without income) and the credit "
            "record (history, credits at this bank); the rest may be null, not provided, and "
            "protected attributes are never required."
        ),
        families=tuple(
            ReasonFamily(name=n, reason=r, missing_reason=m)
            for n, (r, m) in REASON_FAMILIES.items()
        ),
    )


def train_demo(csv_path: Path, out_dir: Path) -> Path:
    """Train the demo model on `csv_path` and write its model directory to `out_dir`."""
    frame, y = read_german_credit(csv_path)
    train, test = holdout_split(y)
    params = {**PARAMS, "monotone_constraints": str(monotone_constraints(frame.columns))}
    dtrain = xgb.DMatrix(frame.iloc[train], y[train], enable_categorical=True, nthread=1)
    booster = xgb.train(params, dtrain, num_boost_round=ROUNDS)
    dtest = xgb.DMatrix(frame.iloc[test], enable_categorical=True, nthread=1)
    holdout_auc = auc(y[test], booster.predict(dtest))
    write_model_dir(bytes(booster.save_raw("json")), demo_schema(frame, holdout_auc), out_dir)
    write_holdout_reference(csv_path, test, out_dir)
    return out_dir


def write_holdout_reference(csv_path: Path, holdout: NDArray[np.intp], model_dir: Path) -> None:
    """The demo's population reference: its hold-out applicants, decided and explained."""
    from service.core.population.reference import REFERENCE_FILE
    from service.core.registry import LoadedModel
    from service.tools.reference import build_reference, read_rows

    model = LoadedModel.from_directory(model_dir)
    rows = read_rows(csv_path, model.schema)
    chosen = [rows[i] for i in sorted(holdout)]
    source = f"{csv_path.name} hold-out ({len(chosen)} applicants)"
    reference = build_reference(model, chosen, source)
    (model_dir / REFERENCE_FILE).write_bytes(reference.to_bytes())
