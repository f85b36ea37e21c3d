"""Subjects are built in one place and cannot be widened by a caller's input."""

import pytest

from specedge import subjects


def test_subjects_are_versioned_and_specific():
    assert subjects.registry_announce("verifier", "v-1") == "specedge.v1.registry.announce.verifier.v-1"
    assert subjects.registry_leave("edge-agent", "e_2") == "specedge.v1.registry.leave.edge-agent.e_2"
    assert subjects.REGISTRY_ANNOUNCE_ALL == "specedge.v1.registry.announce.>"


@pytest.mark.parametrize("bad", ["*", ">", "a.b", "", "has space", "x" * 65])
def test_tokens_that_would_widen_a_subject_are_refused(bad):
    with pytest.raises(ValueError, match="invalid subject token"):
        subjects.registry_announce("verifier", bad)
