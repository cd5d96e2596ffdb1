"""settle_names: a member whose address or port changed takes its other server name."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from poolkeeper.core.model import ActualMember, Admin, DesiredMember, InstanceState, Phase
from poolkeeper.core.naming import alternate_name, instance_part, member_name
from poolkeeper.core.planner import settle_names

NAME = member_name("ns", "web", "uid-1", "check:2:2:3")
OTHER = alternate_name(NAME)


def want(address: str = "10.0.0.1", port: int = 80) -> dict[str, DesiredMember]:
    inst = InstanceState("Pod", "ns", "p", "uid-1", address, {}, Phase.UP, "")
    return {NAME: DesiredMember(NAME, inst, address, port, serving=True)}


def have(name: str, address: str = "10.0.0.1", port: int = 80) -> ActualMember:
    return ActualMember(name, address, port, Admin.READY)


def test_the_other_name_is_the_same_instance_and_goes_back() -> None:
    assert OTHER != NAME and instance_part(OTHER) == instance_part(NAME)
    assert alternate_name(OTHER) == NAME


@given(st.sampled_from([None, "same", "moved"]), st.sampled_from([None, "same", "moved"]))
def test_the_chosen_name_never_holds_a_stale_server_unless_both_do(here: str | None, there: str | None) -> None:
    actual = {}
    for name, kind in ((NAME, here), (OTHER, there)):
        if kind is not None:
            actual[name] = have(name, port=80 if kind == "same" else 81)
    (chosen,) = settle_names(want(), actual)
    assert settle_names(want(), actual)[chosen].name == chosen
    stale = {n for n, m in actual.items() if m.port != 80}
    if stale != {NAME, OTHER}:
        assert chosen not in stale
    if "same" in (here, there):
        assert actual[chosen].port == 80, "a server already at the new address is kept"
    if here is None and there is None:
        assert chosen == NAME


def test_a_port_change_moves_to_the_other_name_and_stays_there() -> None:
    assert list(settle_names(want(port=81), {NAME: have(NAME)})) == [OTHER]
    assert list(settle_names(want(port=81), {NAME: have(NAME), OTHER: have(OTHER, port=81)})) == [OTHER]
    assert list(settle_names(want(port=81), {OTHER: have(OTHER, port=81)})) == [OTHER]
    assert list(settle_names(want(port=80), {OTHER: have(OTHER, port=81)})) == [NAME]
