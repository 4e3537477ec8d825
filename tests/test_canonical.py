"""Canonical JSON and digests: the bytes identity rests on."""

from hypothesis import given, strategies as st

from builder.canonical import canonical_json, file_entries, sha256_bytes, tree_digest

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20)


def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": [1, {"é": None}], "a": True}) == '{"a":true,"b":[1,{"é":null}]}'.encode()


def test_digest_golden_value_is_pinned():
    # Changing this breaks every artifact_id ever issued: it must never change by accident.
    assert sha256_bytes(canonical_json({"a": 1})) == \
        "sha256:015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"


@given(st.dictionaries(st.text(), json_values, max_size=6), st.randoms())
def test_canonical_json_does_not_depend_on_key_order(document, random):
    keys = list(document)
    random.shuffle(keys)
    assert canonical_json({k: document[k] for k in keys}) == canonical_json(document)


def test_tree_digest_depends_on_content_and_names_not_on_listing_order(tmp_path):
    (tmp_path / "b").write_bytes(b"2")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a").write_bytes(b"1")
    entries = file_entries(tmp_path)
    assert [e["path"] for e in entries] == ["b", "sub/a"]
    assert tree_digest(entries) == tree_digest(list(reversed(entries)))
    (tmp_path / "b").write_bytes(b"3")
    assert tree_digest(file_entries(tmp_path)) != tree_digest(entries)


def test_files_hashed_in_threads_or_given_as_known_give_the_same_entries(tmp_path, monkeypatch):
    from builder import canonical

    for index in range(5):
        (tmp_path / f"f{index}").write_bytes(bytes([index]) * (index * 1000 + 1))
    alone = file_entries(tmp_path)
    monkeypatch.setattr(canonical, "PARALLEL_BYTES", 0)  # every tree counts as large: threads hash it
    assert file_entries(tmp_path) == alone
    known = {"f3": alone[3]}
    original = canonical.sha256_file
    monkeypatch.setattr(canonical, "sha256_file", lambda path: None if path.name == "f3" else original(path))
    assert file_entries(tmp_path, known=known) == alone  # f3 is not hashed again
