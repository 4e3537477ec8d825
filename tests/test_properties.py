"""Property tests: resolution and identity are stable under any input; nothing crashes with a traceback."""

import contextlib
import io
import os

from hypothesis import HealthCheck, given, settings, strategies as st

from builder import cli
from builder.canonical import canonical_json, sha256_bytes
from builder.errors import BuilderError
from builder.release.lock import lock_entry
from conftest import PROJECT

RELEASE = "smollm2-135m-instruct-fp8-dynamic"


def uncached(overrides: tuple) -> dict:
    """A lock entry resolved afresh (BUILDER_CACHE=off), to hold against what the cache returns."""
    previous = os.environ.get("BUILDER_CACHE")
    os.environ["BUILDER_CACHE"] = "off"
    try:
        return lock_entry(PROJECT, RELEASE, overrides)
    finally:
        if previous is None:
            del os.environ["BUILDER_CACHE"]
        else:
            os.environ["BUILDER_CACHE"] = previous
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.integers(min_value=-(2 ** 80), max_value=2 ** 80) | st.text() | st.booleans() | st.none()
           | st.floats(allow_nan=False, allow_infinity=False))


@given(st.dictionaries(st.text(), scalars, max_size=8))
def test_hash_of_a_document_is_independent_of_key_insertion_order(document):
    reordered = dict(sorted(document.items(), key=lambda item: repr(item[1]), reverse=True))
    assert sha256_bytes(canonical_json(reordered)) == sha256_bytes(canonical_json(document))


@given(st.text(min_size=1, max_size=40))
def test_unicode_strings_survive_canonical_json_exactly(text):
    import json

    assert json.loads(canonical_json({"value": text}))["value"] == text


@SLOW
@given(st.text(max_size=60))
def test_random_override_strings_never_crash_with_a_traceback(override):
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout), contextlib.chdir(PROJECT):
        try:
            code = cli.main(["resolve", RELEASE, "--", override] if override.startswith("-") else
                            ["resolve", RELEASE, override])
        except SystemExit as exit:  # argparse rejecting the argument itself
            code = exit.code
    assert code in (0, 2), stderr.getvalue()
    assert "Traceback" not in stderr.getvalue()


@SLOW
@given(st.integers(min_value=1, max_value=2 ** 62))
def test_large_numbers_resolve_to_an_error_or_a_stable_hash(length):
    overrides = (f"context.max_model_len={length}",)
    try:
        first = lock_entry(PROJECT, RELEASE, overrides)
    except BuilderError as error:
        assert all(p.key.startswith("context.") or "max_model_len" in p.message for p in error.problems)
        return
    assert lock_entry(PROJECT, RELEASE, overrides) == first == uncached(overrides)  # the cache changes nothing
    assert first["spec"]["context"]["max_model_len"] == length


@SLOW
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20))
def test_unicode_release_descriptions_give_stable_ids(description):
    quoted = "'" + description.replace("'", "\\'") + "'"
    overrides = (f"+release.description={quoted}",)
    try:
        first = lock_entry(PROJECT, RELEASE, overrides)
    except BuilderError:
        return  # a string Hydra's grammar cannot take is an input error, which is what we promise
    assert first["spec"]["release"]["description"] == description
    assert lock_entry(PROJECT, RELEASE, overrides) == first == uncached(overrides)
