"""The lab world's bookkeeping that operators do by hand (swapping the rack)."""

from __future__ import annotations

from hardware_mocks.clock import SimClock
from hardware_mocks.physics.electrolyte import landesfeind_blend
from hardware_mocks.world import LabWorld


def test_fresh_rack_swaps_used_vials_for_empty_ones_and_keeps_the_used() -> None:
    world = LabWorld(SimClock(100.0), landesfeind_blend, rack_slots=4)
    world.vials["V01"].contents_g["EC"] = 2.0  # used, back in the rack
    world.pick("rack/2")
    world.place("balance")  # V02 is out on the deck
    world.vials["V02"].contents_g["DMC"] = 1.0
    new = world.fresh_rack()
    assert new == ["V05"]
    assert world.stations["rack/1"] == "V05" and world.vials["V05"].contents_g == {}
    assert world.vials["V01"].station == "archive"
    assert world.vials["V01"].contents_g == {"EC": 2.0}  # nothing is thrown away
    assert world.stations["rack/2"] is None  # its vial is on the balance
    assert world.stations["balance"] == "V02"
    assert world.stations["rack/3"] == "V03"  # unused vials stay
    assert world.fresh_rack() == []  # nothing used in the rack any more
