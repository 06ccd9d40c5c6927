"""Every registered operator is checked against torch.autograd in both graph modes."""

from __future__ import annotations

import importlib
import pathlib
import pkgutil

import pytest
import torch

import luoshu as ls
import tests.ops as cases_pkg
from tests.ops.harness import check, ops_checked


def _all_cases():
    cases = []
    for info in pkgutil.iter_modules(cases_pkg.__path__):
        if info.name.startswith("cases_"):
            cases += importlib.import_module(f"tests.ops.{info.name}").CASES
    return cases


CASES = _all_cases()


def test_case_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_op_matches_torch(case):
    check(case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [c for c in CASES if c.seed is None], ids=lambda c: c.name)
def test_op_matches_torch_on_cuda(case):
    # Random ops are left out: CUDA generators draw different streams than the CPU reference.
    check(case, device="cuda")


def _import_every_op_module() -> None:
    """Some families register their ops only when imported (ps_*); the registry must be complete."""
    import luoshu.ops

    for info in pkgutil.walk_packages(luoshu.ops.__path__, "luoshu.ops."):
        importlib.import_module(info.name)


def test_every_registered_op_has_a_case():
    _import_every_op_module()
    root = pathlib.Path(__file__).resolve().parents[2]
    # Ops whose effect is a state change (optimizer updates, server pushes) are checked by the test
    # module their OpDef names in `tested_by`, against torch.optim or a server.
    covered = {name for name, opdef in ls.core.registered_ops().items()
               if getattr(opdef, "tested_by", None) and (root / opdef.tested_by).is_file()}
    for case in CASES:
        covered |= ops_checked(case)
    missing = sorted(set(ls.core.registered_ops()) - covered)
    assert not missing, (f"registered ops without a case of their own in tests/ops/cases_*.py (a *_backward op "
                         f"needs a second_order case of its forward op): {missing}")


def test_the_coverage_rule_does_not_count_helpers():
    """A first-order case meets softmax_backward only as a helper; a second-order case checks it."""
    from tests.ops.harness import OpCase

    first = OpCase("x", lambda x: ls.ops.softmax(x), lambda x: torch.softmax(x, -1), [(2, 3)])
    assert "softmax_backward" not in ops_checked(first) and "softmax" in ops_checked(first)
    second = OpCase("y", lambda x: ls.ops.softmax(x), lambda x: torch.softmax(x, -1), [(2, 3)], second_order=True)
    assert "softmax_backward" in ops_checked(second)
