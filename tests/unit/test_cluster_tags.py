"""The tags the nodes share leases and checks under (registry/cluster.py): valid tag names
whatever the image's tag, and never one another's; and how often a waiting node looks."""

from __future__ import annotations

import json
import re

import pytest

from nodekeeper.registry.cluster import check_tag, lease_tag, marker, poll_gap

TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")  # the distribution spec's rule


@pytest.mark.parametrize("tag", ["1", "latest", "v1.2.3-rc_1", "x" * 111, "x" * 112, "x" * 128,
                                 "_" + "A" * 127])
def test_every_tag_has_a_valid_check_tag(tag: str) -> None:
    assert TAG.match(check_tag(tag))


def test_a_tag_that_fits_is_kept_readable_and_a_long_one_is_hashed() -> None:
    assert check_tag("15-alpine") == "nodekeeper.check-15-alpine"
    long_one, other = "a" * 128, "a" * 127 + "b"
    assert check_tag(long_one).startswith("nodekeeper.check--")
    assert check_tag(long_one) != check_tag(other)
    # A tag never starts with '-': no short tag takes a long tag's hashed name.
    assert not TAG.match(check_tag(long_one)[len("nodekeeper.check-"):])


def test_a_lease_tag_is_per_digest() -> None:
    one, two = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32
    assert TAG.match(lease_tag(one))
    assert lease_tag(one) == "nodekeeper.lease-" + "ab" * 16
    assert lease_tag(one) != lease_tag(two)


def test_a_marker_is_an_index_of_nothing_carrying_its_annotations() -> None:
    document = json.loads(marker({"dev.nodekeeper.check.node": "node-a"}))
    assert document["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert document["manifests"] == []
    assert document["annotations"] == {"dev.nodekeeper.check.node": "node-a"}


def test_a_waiting_node_looks_often_at_first_and_less_often_the_longer_it_waits() -> None:
    gaps, waited = [], 0.0
    while waited < 5.0:
        gaps.append(poll_gap(waited))
        waited += gaps[-1]
    assert gaps[0] == 0.05
    assert gaps == sorted(gaps)
    # Never more than a tenth late (past the first 50 ms), and a 5 s wait costs backing
    # a few dozen HEADs, not a hundred.
    assert all(gap <= max(0.05, 0.1 * (sum(gaps[:i]))) + 1e-9 for i, gap in enumerate(gaps))
    assert 20 <= len(gaps) <= 50
    assert poll_gap(3600.0) == 1.0
