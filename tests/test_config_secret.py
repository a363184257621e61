"""The MP key wrapper cannot leak through the usual ways a value ends up in a log or a file (defect 11)."""

from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest

from pipeline.config import Secret, mp_api_key

KEY = "abcdEFGH1234abcdEFGH1234abcdEFGH"


def _shown(s: Secret) -> list[str]:
    return [str(s), repr(s), f"{s}", f"{s!r}", "%s" % s, "{}".format(s),  # noqa: UP031, UP032 - the old ways on purpose
            json.dumps({"k": s}, default=str),
            str([s]), str({"k": s})]


def test_no_text_form_shows_the_key():
    s = Secret(KEY)
    for text in _shown(s):
        assert KEY not in text and "********" in text


@pytest.mark.parametrize("leak", [
    lambda s: json.dumps(s),
    lambda s: json.dumps({"key": s}),
    lambda s: "Bearer " + s,
    lambda s: s + "suffix",
    lambda s: "".join(["a", s]),  # noqa: FLY002
    lambda s: pickle.dumps(s),
    lambda s: s.encode(),
    lambda s: s[0:4],
])
def test_concatenation_serialisation_and_slicing_raise(leak):
    with pytest.raises((TypeError, AttributeError)):
        leak(Secret(KEY))


def test_logging_and_copy_do_not_leak(caplog):
    s = Secret(KEY)
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("key=%s %r", s, s)
    assert KEY not in caplog.text
    assert copy.copy(s).reveal() == KEY and s.reveal() == KEY
    with pytest.raises(AttributeError):
        s._value = "x"


def test_mp_api_key_from_env():
    assert mp_api_key({"MP_API_KEY": f"  {KEY} "}).reveal() == KEY
    assert mp_api_key({"MP_API_KEY": " "}) is None
