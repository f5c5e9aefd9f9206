from __future__ import annotations

from postroom.ids import is_queue_id, new_queue_id


def test_ids_are_unique_and_well_formed() -> None:
    ids = [new_queue_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(is_queue_id(i) for i in ids)
    assert ids == sorted(ids) or len({i[:8] for i in ids}) > 1
