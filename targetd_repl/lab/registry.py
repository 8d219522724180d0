"""The scenario registry. A scenario is a function run inside the guest; it returns a JSON-able
dict (the data the host-side test asserts on) or raises.

Scenarios live in modules named `targetd_repl.lab.scenarios_<topic>` and register themselves
with `@scenario(...)`; `load_all()` imports every such module, so adding a topic needs no edit
here. Modules must import guest-only things (rtslib, pyudev, the data path) inside the function
bodies so the host can list scenarios cheaply.

A scenario registered with `sites=("a", "b")` is a two-site scenario: `run_pair_scenario` boots
one guest per site and runs the same function in both, with `ctx.site` telling each which half
it is (see `sites`).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import targetd_repl.lab as lab_package

if TYPE_CHECKING:
    from targetd_repl.lab.guest import GuestContext

ScenarioFunc = Callable[["GuestContext"], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    func: ScenarioFunc
    needs: frozenset[str]  # "iscsid": started before, stopped after
    timeout_s: float  # the host's default wall-clock limit, boot included
    doc: str
    sites: tuple[str, ...] = ()  # two-site scenarios: the site names, one guest each


SCENARIOS: dict[str, Scenario] = {}
SITE_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")  # goes into hostnames and IQNs
KNOWN_NEEDS = frozenset({"iscsid"})


def scenario(
    name: str,
    *,
    needs: tuple[str, ...] = (),
    timeout_s: float = 240,
    sites: tuple[str, ...] = (),
) -> Callable[[ScenarioFunc], ScenarioFunc]:
    unknown = set(needs) - KNOWN_NEEDS
    if unknown:
        raise ValueError(f"scenario {name}: unknown needs {sorted(unknown)}")
    if sites and (len(sites) != 2 or len(set(sites)) != 2 or not all(map(SITE_NAME.match, sites))):
        raise ValueError(f"scenario {name}: sites must be two distinct names like a, b: {sites}")

    def register(func: ScenarioFunc) -> ScenarioFunc:
        if name in SCENARIOS and SCENARIOS[name].func is not func:
            raise ValueError(f"scenario {name} is registered twice")
        doc = (func.__doc__ or "").strip().splitlines()
        SCENARIOS[name] = Scenario(
            name, func, frozenset(needs), timeout_s, doc[0] if doc else "", tuple(sites)
        )
        return func

    return register


def load_all() -> dict[str, Scenario]:
    """Import every `targetd_repl.lab.scenarios_*` module and return the registry."""
    for module in pkgutil.iter_modules(lab_package.__path__):
        if module.name.startswith("scenarios_"):
            importlib.import_module(f"{lab_package.__name__}.{module.name}")
    return SCENARIOS
