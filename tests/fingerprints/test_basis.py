from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cscr.fingerprints.basis import TokenBasis, pre_tokenize


def test_pre_tokenize_keeps_leading_spaces_and_splits_classes():
    assert pre_tokenize("What is 12+7? Answer: yes\n\nok_go") == [
        "What", " is", "1", "2", "+", "7", "?", " Answer", ":", " yes", "\n\n", "ok", "_", "go"]


def test_basis_is_the_most_frequent_strings_ties_by_string():
    texts = ["the cat the dog", "the cat a bird", "zebra"]
    b = TokenBasis.from_texts(texts, 3)
    # "the" (no leading space) x2 and " cat" x2, then the ties at 1 broken by the string
    assert b.strings == (" cat", "the", " a")
    assert TokenBasis.from_texts(list(reversed(texts)), 3) == b  # order of texts does not matter


def test_basis_id_hashes_the_strings():
    a = TokenBasis(("x", " y", " z"))
    assert a.basis_id == TokenBasis(("x", " y", " z")).basis_id
    assert a.basis_id != TokenBasis(("x", " z", " y")).basis_id
    assert a.basis_id.startswith("tok3-")
    assert TokenBasis.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="basis id mismatch"):
        TokenBasis.from_dict({"basis_id": "tok3-0000", "strings": list(a.strings)})


def test_too_few_distinct_strings_is_a_clear_error():
    with pytest.raises(ValueError, match="only 3 distinct token strings"):
        TokenBasis.from_texts(["a b a b"], 5)  # "a", " b", " a"
    with pytest.raises(ValueError, match="unique"):
        TokenBasis(("a", "a"))


def test_each_tokenizer_maps_strings_to_its_own_first_subtoken(tiny_lm, smollm2):
    basis = TokenBasis((" the", ".", " 1234567", " Answer", "7"))
    for path in (tiny_lm, smollm2):
        tok = AutoTokenizer.from_pretrained(path)
        ids = basis.token_ids(tok)
        for s, i in zip(basis.strings, ids, strict=True):
            assert i == tok.encode(s, add_special_tokens=False)[0]
            assert s.startswith(tok.decode([i])) or tok.decode([i]).strip() == ""
    smol = AutoTokenizer.from_pretrained(smollm2)
    assert smol.convert_ids_to_tokens(basis.token_ids(smol))[0] == "Ġthe"
    assert smol.convert_ids_to_tokens(basis.token_ids(smol))[2] == "Ġ"  # " 1234567" splits: first sub-token
    assert smol.decode(basis.token_ids(smol)[4]) == "7"
