"""A storage key names a file below the store, never outside it."""

import pytest

from outgoing.storage import FileStore


@pytest.mark.parametrize("key", ["../etc/passwd", "/etc/passwd", "a/../../x", "a//b", "",
                                 "./a", "a/./b", "a\0b"])
def test_a_key_that_could_leave_the_store_is_refused(tmp_path, key):
    with pytest.raises(ValueError):
        FileStore(tmp_path).put(key, b"x")


def test_a_generated_key_is_written_and_read_back(tmp_path):
    store = FileStore(tmp_path)
    key = store.new_key("archive")
    store.put(key, b"body")
    assert store.get(key) == b"body"
    assert (tmp_path / key).read_bytes() == b"body"


def test_a_batch_is_written_whole_or_not_at_all(tmp_path):
    """Bodies of a batch are written and synced together; when one fails, none is left,
    neither in place nor as a temporary file, and no row points at one."""
    store = FileStore(tmp_path)
    good = [(store.new_key("archive"), b"one" * 1000), (store.new_key("archive"), b"two")]
    store.put_many(good)
    assert [store.get(key) for key, _ in good] == [b"one" * 1000, b"two"]

    class Row:
        storage_key = None

    rows = [(Row(), b"three"), (Row(), "not bytes")]
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(TypeError):
        store.attach_many(rows, "archive")
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before
    assert [row.storage_key for row, _ in rows] == [None, None]
