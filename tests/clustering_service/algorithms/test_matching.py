"""Id matching across versions and the stability report, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from clustering_service.algorithms import ClusteringInputError
from clustering_service.algorithms.matching import (
    match_clusters,
    match_labels,
    relabel_to_parent,
    stability_report,
)

OLD_CENTERS = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)


def test_match_clusters_permutation():
    # new 0 = (0, 9) is near old 2, new 1 = (1, 0) near old 0, new 2 = (9, 1) near old 1
    new = np.array([[0, 9], [1, 0], [9, 1]], dtype=np.float32)
    perm = match_clusters(OLD_CENTERS, new)
    assert perm.tolist() == [1, 2, 0]
    np.testing.assert_array_equal(new[perm], new[[1, 2, 0]])


def test_match_clusters_is_global_not_greedy():
    # greedy nearest: old 0 -> new 0 (squared distance 1), then old 1 -> new 1 (25): 26
    # Hungarian: old 0 -> new 1 (4), old 1 -> new 0 (4): 8
    old = np.array([[0.0], [3.0]])
    new = np.array([[1.0], [-2.0]])
    assert match_clusters(old, new).tolist() == [1, 0]


def test_match_clusters_unequal_counts():
    more = np.vstack([OLD_CENTERS, [[50, 50]]])
    assert match_clusters(OLD_CENTERS, more).tolist() == [0, 1, 2]  # new 3 is new
    fewer = OLD_CENTERS[[2, 0]] + 0.5
    assert match_clusters(OLD_CENTERS, fewer).tolist() == [1, -1, 0]  # old 1 unmatched
    with pytest.raises(ClusteringInputError):
        match_clusters(OLD_CENTERS, np.zeros((3, 5)))


def test_match_labels_and_fresh_ids():
    # 8 retained items. Old internal ids 0..2 carry public ids 10, 11, 12; ids 0..9
    # were retired in earlier versions, so next_id = 13.
    #   old = 0 0 1 1 2 2 2 2
    #   new = 3 3 0 0 1 1 1 2
    # shared items (new x old): new3-old0 2, new0-old1 2, new1-old2 3, new2-old2 1
    # one-to-one best: new3->old0, new0->old1, new1->old2 (total 7); new2 is new.
    old = [0, 0, 1, 1, 2, 2, 2, 2]
    new = [3, 3, 0, 0, 1, 1, 1, 2]
    mapping = match_labels(old, new, 3, 4)
    assert mapping == {0: 1, 1: 2, 2: None, 3: 0}
    labels, ids, next_id = relabel_to_parent(new, mapping, 13, parent_ids=[10, 11, 12])
    assert ids.tolist() == [11, 12, 13, 10]
    assert labels.tolist() == [10, 10, 11, 11, 12, 12, 12, 13]
    assert next_id == 14
    # Next version: old id 11 disappears (retired); a new cluster appears.
    # It must get 14, never 11 (nor any of 0..10).
    labels2, ids2, next_id2 = relabel_to_parent([0, 1, 1], {0: 0, 1: None}, next_id, [10, 12, 13])
    assert ids2.tolist() == [10, 14] and labels2.tolist() == [10, 14, 14] and next_id2 == 15


def test_match_labels_zero_overlap_is_not_a_match():
    # new 1 shares no item with any old cluster; Hungarian pairs it with old 1
    # (the only one left) at overlap 0 -> reported as new.
    assert match_labels([0, 0, 0], [0, 0, 1], 2, 2) == {0: 0, 1: None}


def test_relabel_rejects_inconsistent_input():
    with pytest.raises(ClusteringInputError):
        relabel_to_parent([0, 1], {0: 0, 1: 0}, 5)  # old 0 matched twice
    with pytest.raises(ClusteringInputError):
        relabel_to_parent([0], {0: 0}, 5, parent_ids=[7])  # parent id beyond the counter
    with pytest.raises(ClusteringInputError):
        match_labels([0, 3], [0, 0], 2, 1)  # old label out of range


def test_stability_report_six_items_by_hand():
    # old = 0 0 1 1 2 2, new = 0 0 1 2 2 2: item 4 moved from 1 to 2.
    # kept = 5/6. ARI: pair counts of the contingency (old x new)
    #   [[2,0,0],[0,1,1],[0,0,2]] -> sum C(n_ij,2) = 1 + 1 = 2
    #   rows (2,2,2) -> 3; cols (2,1,3) -> 1 + 0 + 3 = 4; C(6,2) = 15
    #   expected = 3*4/15 = 0.8, max = (3+4)/2 = 3.5
    #   ARI = (2 - 0.8) / (3.5 - 0.8) = 1.2 / 2.7 = 4/9
    # centres: id 0 moves by (3, 4) -> 5, id 1 by 0, id 2 by (0, 1) -> 1:
    #   mean 2, max 5. sizes (2,2,2) -> (2,1,3): change (0,-1,+1).
    old_c = np.zeros((3, 2))
    new_c = np.array([[3, 4], [0, 0], [0, 1]])
    r = stability_report([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 2], old_c, new_c)
    assert r["n_retained"] == 6
    assert r["kept_fraction"] == pytest.approx(5 / 6)
    assert r["kept_fraction_matched"] == pytest.approx(5 / 6)
    assert r["ari"] == pytest.approx(4 / 9)
    assert r["centroid_shift"] == pytest.approx([5, 0, 1])
    assert (r["centroid_shift_mean"], r["centroid_shift_max"]) == pytest.approx((2, 5))
    assert r["sizes_old"] == [2, 2, 2] and r["sizes_new"] == [2, 1, 3]
    assert r["size_change"] == [0, -1, 1]


def test_stability_report_separates_id_drift_from_real_change():
    # Same partition under permuted ids: nothing kept raw, everything after matching.
    r = stability_report([0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1])
    assert r["kept_fraction"] == 0.0
    assert r["kept_fraction_matched"] == 1.0 and r["ari"] == pytest.approx(1.0)
    assert "centroid_shift" not in r


def test_stability_report_full_sizes():
    r = stability_report([0, 1], [0, 1], old_sizes=[10, 5], new_sizes=[12, 5, 3])
    assert r["sizes_old"] == [10, 5, 0] and r["size_change"] == [2, 0, 3]
