"""Prompt-lookup drafting proposes what followed earlier occurrences of the suffix."""
from device_client.drafters.ngram import NgramDrafter, NgramIndex


def test_lookup_prefers_longest_and_most_recent_match():
    ctx = [1, 2, 3, 9, 1, 2, 3, 8, 7, 2, 3]
    index = NgramIndex(3)
    index.sync(ctx)
    paths = index.continuations(ctx, depth=2)
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


def test_one_drafter_follows_a_growing_context_and_a_new_one():
    drafter = NgramDrafter()
    assert drafter.propose([5, 6, 7, 5], None, budget=4).tokens == (5, 6, 7, 5)
    assert drafter.propose([5, 6, 7, 5, 6], None, budget=4).tokens == (6, 7, 5, 6)  # grown incrementally
    assert drafter.propose([1, 2, 1], None, budget=4).tokens == (1, 2, 1)  # another session: rebuilt


def test_index_grows_incrementally_and_matches_a_rebuild():
    ctx = [1, 2, 3, 9, 1, 2, 3, 8, 7, 2, 3, 1, 2]
    grown, fresh = NgramIndex(4), NgramIndex(4)
    for end in range(1, len(ctx) + 1):
        grown.sync(ctx[:end])
    fresh.sync(ctx)
    assert grown.maps == fresh.maps and grown.hits == fresh.hits
    # the longest earlier suffix is (1, 2), twice, followed by 3 (at positions 2 and 6) both times
    assert grown.lookup(ctx) == (2, [2, 6])
    assert grown.candidates(ctx) == {3: (2, 0)}
    grown.sync([5, 6])  # not an extension (a new session): rebuilt
    assert grown.tokens == [5, 6] and grown.lookup([5, 6]) == (0, [])


def test_index_candidates_kinds_and_copy_rate():
    idx = NgramIndex(3)
    idx.sync([4, 5, 6, 4, 5, 7, 4, 5, 6, 1, 5])
    assert idx.candidates([4, 5]) == {6: (2, 1), 7: (2, 2)}  # 6 twice (most frequent), 7 once
    assert idx.candidates([7, 4, 5]) == {6: (3, 0), 7: (2, 3)}  # 7 follows only the shorter (4, 5)
    assert idx.candidates([9]) == {}
    rep = NgramIndex(4, copy_window=8)
    rep.sync([1, 2, 3, 4] * 6)
    assert rep.copy_rate() == 1.0  # a repeating text is predicted token after token
    assert NgramIndex().copy_rate() == 0.0
