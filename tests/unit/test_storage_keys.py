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
