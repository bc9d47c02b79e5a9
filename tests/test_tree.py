"""The tree module on its own: structure, validation, mask, accepted path, merging."""
import numpy as np
import pytest

from shared.tree import TokenTree, TreeError, merge_paths


def test_depths_mask_and_paths():
    tree = TokenTree((10, 11, 12, 13, 14), (-1, 0, 0, 1, 3))
    assert tree.depths == (0, 1, 1, 2, 3)
    assert tree.path_to(4) == [0, 1, 3, 4]
    mask = tree.ancestor_mask()
    expected = np.array([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 1, 1],
    ], dtype=bool)
    assert (mask == expected).all()


def test_accepted_path_follows_target_choices():
    tree = TokenTree((10, 11, 12, 13, 14), (-1, 0, 0, 1, 3))
    # after root the target says 12 -> node 2, which has no children
    assert tree.accepted_path([12, 0, 99, 0, 0]) == [0, 2]
    # root -> 11 (node 1) -> 13 (node 3) -> 14 (node 4)
    assert tree.accepted_path([11, 13, 0, 14, 7]) == [0, 1, 3, 4]
    assert tree.accepted_path([5, 0, 0, 0, 0]) == [0]


@pytest.mark.parametrize("tokens,parents,needle", [
    ((1, 2), (-1, 1), "parents must come before"),
    ((1, 2), (-1, 5), "parents must come before"),
    ((1, 2, 3), (-1, 0), "parent indices"),
    ((), (), "empty"),
    ((1, 2), (0, 0), "root"),
])
def test_invalid_trees_explain_themselves(tokens, parents, needle):
    with pytest.raises(TreeError, match=needle):
        TokenTree(tokens, parents)


def test_duplicate_siblings_rejected():
    tree = TokenTree((1, 5, 5), (-1, 0, 0))
    with pytest.raises(TreeError, match="siblings"):
        tree.check_unique_siblings()


def test_wire_round_trip_keeps_root_implicit():
    tree = TokenTree((7, 8, 9), (-1, 0, 1))
    tokens, parents = tree.to_wire()
    assert (tokens, parents) == ([8, 9], [0, 1])
    assert TokenTree.from_wire(7, tokens, parents) == tree


def test_merge_paths_shares_prefixes_and_respects_budget():
    tree = merge_paths(1, [[2, 3, 4], [2, 3, 5], [6]], budget=10)
    assert tree.tokens == (1, 2, 3, 4, 5, 6)
    assert tree.parents == (-1, 0, 1, 2, 2, 0)
    small = merge_paths(1, [[2, 3, 4], [6]], budget=3)
    assert small.tokens == (1, 2, 3)


def test_reroot_keeps_the_subtree_still_ahead():
    #        10
    #      /    \
    #     11     12
    #    /  \      \
    #   13   15     16
    #   |
    #   14
    tree = TokenTree((10, 11, 12, 13, 14, 15, 16), (-1, 0, 0, 1, 3, 1, 2))
    assert tree.reroot([]) is tree
    sub = tree.reroot([11])
    assert sub.tokens == (11, 13, 14, 15) and sub.parents == (-1, 0, 1, 0)
    assert tree.reroot([11, 13]).tokens == (13, 14)
    assert tree.reroot([11, 13, 14]) == TokenTree.root_only(14)
    assert tree.reroot([12, 16]) == TokenTree.root_only(16)
    assert tree.reroot([13]) is None  # 13 is not a child of the root
    assert tree.reroot([11, 13, 14, 99]) is None  # generation ran past the tree
    # the re-rooted tree accepts what the original would have accepted further down
    choices = {10: 11, 11: 13, 13: 14, 14: 7, 12: 0, 15: 0, 16: 0}
    full = tree.accepted_path([choices[t] for t in tree.tokens])
    assert [tree.tokens[i] for i in full] == [10, 11, 13, 14]
    assert [sub.tokens[i] for i in sub.accepted_path([choices[t] for t in sub.tokens])] == [11, 13, 14]
