"""Prompt-lookup drafting proposes what followed earlier occurrences of the suffix."""
from device_client.drafters.ngram import NgramDrafter, lookup_continuations


def test_lookup_prefers_longest_and_most_recent_match():
    ctx = [1, 2, 3, 9, 1, 2, 3, 8, 7, 2, 3]
    paths = lookup_continuations(ctx, max_ngram=3, depth=2)
    # suffix (2, 3) occurred twice; the most recent occurrence came before 8
    assert paths[0] == [8, 7]
    assert [9, 1] in paths


def test_drafter_tree_is_rooted_at_last_token_and_within_budget():
    ctx = [5, 6, 7, 5, 6, 7, 5, 6]
    tree = NgramDrafter().propose(ctx, None, budget=4)
    assert tree.tokens[0] == 6 and len(tree) <= 4
    assert tree.tokens[1] == 7


def test_no_match_gives_root_only():
    assert len(NgramDrafter().propose([1, 2, 3], None, budget=8)) == 1
