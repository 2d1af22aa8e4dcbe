"""Prompt lookup (the n-gram proposer's pure lookup)."""

from services.speculative.ngram import propose_ngram


def test_the_longest_suffix_that_occurred_before_gives_what_followed_it():
    assert propose_ngram([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert propose_ngram([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]  # only the bigram [2, 3] recurs
    # The latest occurrence wins: [1, 2] was followed by 3, then by 8.
    assert propose_ngram([1, 2, 3, 1, 2, 8, 1, 2], 1) == [8]


def test_fewer_or_none_when_the_match_is_near_the_end_or_absent():
    assert propose_ngram([7, 7, 7, 7], 4) == [7]
    assert propose_ngram([1, 2, 3], 3) == []
    assert propose_ngram([1], 3) == []
    assert propose_ngram([1, 2, 3, 4, 2], 3) == []  # a single token is too short a match (MIN_N 2)
