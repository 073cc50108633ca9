"""The top-level package exports every public name, and only names that exist."""

from __future__ import annotations

import inspect

import redcredit
from redcredit import errors, results


def _public_classes(module: object) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if inspect.isclass(value)
        and value.__module__ == getattr(module, "__name__", None)
        and not name.startswith("_")
    }


def test_every_exported_name_resolves() -> None:
    missing = [name for name in redcredit.__all__ if not hasattr(redcredit, name)]
    assert missing == []


def test_all_is_sorted_and_unique() -> None:
    assert redcredit.__all__ == sorted(set(redcredit.__all__))
    assert errors.__all__ == sorted(set(errors.__all__))


def test_every_error_class_is_listed_and_exported() -> None:
    classes = _public_classes(errors)
    assert classes == set(errors.__all__)
    assert classes <= set(redcredit.__all__)
    for name in classes:
        assert getattr(redcredit, name) is getattr(errors, name)


def test_results_and_settings_are_exported() -> None:
    assert set(results.__all__) <= set(redcredit.__all__)
    for name in ("LimitSettings", "PlanSettings", "RefillSettings", "Settings", "Syncer"):
        assert name in redcredit.__all__


def test_plan_models_keep_their_documented_location() -> None:
    from redcredit import config, plans

    for name in ("LimitSettings", "PlanSettings", "RefillSettings", "BUILTIN_PLANS"):
        assert getattr(config, name) is getattr(plans, name)
    assert set(plans.__all__) <= set(config.__all__)
