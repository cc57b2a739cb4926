"""Generality: every strategy on a tiny random-init model of each of many timm families.

One test per (family, strategy) cell of the case table in ``tests/backbone_cases.py`` (also printed as a
Markdown table by ``benchmarks/backbone_table.py``). Each cell builds the strategy on the family's model,
takes two optimizer steps (frozen weights unchanged, something beyond the head moved), round-trips the task
delta into a freshly built TransferClassifier (same logits), and merges LoRA (same logits). A strategy that
does not fit must refuse with a ``vt.StrategyError`` naming the strategy and the model; the refusals the
table expects are listed per family (``Case.refuses``), so a new refusal or a refusal that went away
both show up here.

Cells known to be broken are ``xfail(strict=True)`` with their cause: fixing one turns its xfail into a
failure, the signal to delete the entry from ``Case.broken``. The bigger families run only with
``VISIONTUNE_NIGHTLY=1`` (marker ``nightly``).
"""

from __future__ import annotations

import pytest

import backbone_cases as bc


def _cells() -> list:
    params = []
    for case in bc.CASES:
        for strategy in bc.strategies():
            marks = []
            if case.nightly:
                marks.append(pytest.mark.nightly)
            cause = case.broken.get(strategy)
            if cause is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=cause))
            params.append(pytest.param(case, strategy, marks=marks, id=f"{case.id}-{strategy}"))
    return params


def test_case_table_is_well_formed():
    known = set(bc.strategies())
    default = [c for c in bc.CASES if not c.nightly]
    assert len({c.model for c in default}) >= 30, "at least 30 timm families outside the nightly list"
    for case in bc.CASES:
        assert set(case.refuses) <= known and set(case.broken) <= known, case.id
        assert not set(case.refuses) & set(case.broken), f"{case.id}: a cell is either refused or broken"
    assert known <= set(bc.OPTIONS), "give every registered strategy its small options in OPTIONS"


@pytest.mark.parametrize(("case", "strategy"), _cells())
def test_cell(case: bc.Case, strategy: str, tmp_path):
    outcome = bc.run_cell(case, strategy, tmp_path)
    if isinstance(outcome, bc.Refused):
        assert strategy in case.refuses, (
            f"{strategy} now refuses {case.model}: {outcome.message}\n(if that is right, add it to the "
            f"family's 'refuses' in tests/backbone_cases.py)"
        )
    else:
        assert strategy not in case.refuses, (
            f"{strategy} no longer refuses {case.model} and passes every check: remove it from the family's "
            "'refuses' in tests/backbone_cases.py"
        )
