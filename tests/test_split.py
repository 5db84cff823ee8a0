import pytest

from iddm_core.errors import InputError
from iddm_core.protection.split import split_by_names, split_indices


def test_split_is_disjoint_deterministic_and_covers_all():
    a = split_indices(8, seed=3)
    assert a == split_indices(8, seed=3)
    assert len(a.reference) == 4 and len(a.protect) == 4
    assert set(a.reference).isdisjoint(a.protect)
    assert set(a.reference) | set(a.protect) == set(range(8))
    assert any(split_indices(8, seed=s) != a for s in range(4, 10))


def test_split_minimum_is_two_plus_one():
    s = split_indices(3)
    assert (len(s.reference), len(s.protect)) == (2, 1)
    for n in (0, 1, 2):   # one photo used to say "n_reference=2 is outside 0..1"
        with pytest.raises(InputError, match=rf"need at least 3 photos with a face \(2 reference \+ 1 protected\); "
                                             rf"found {n}\."):
            split_indices(n)
    for bad in (9, 5, 1, 0):
        with pytest.raises(InputError, match=rf"n_reference={bad} must be between 2 and 4: 5 usable photos"):
            split_indices(5, n_reference=bad)
    assert len(split_indices(5, n_reference=4).protect) == 1


def test_split_by_names_override():
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    s = split_by_names(names, ["b.jpg", "d.jpg"])
    assert s.reference == (1, 3) and s.protect == (0, 2)
    s = split_by_names(names, ["a.jpg", "b.jpg"], ["d.jpg"])
    assert s.protect == (3,)
    with pytest.raises(InputError, match="x.jpg"):
        split_by_names(names, ["x.jpg", "a.jpg"])
    with pytest.raises(InputError, match="both"):
        split_by_names(names, ["a.jpg", "b.jpg"], ["b.jpg"])
