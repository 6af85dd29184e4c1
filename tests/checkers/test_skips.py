"""Nothing skips silently (issue 26): a skip whose reason is not one of
conftest.ALLOWED_SKIPS fails the session, whatever made it (pytest.skip,
importorskip, a skipif); an allowed one passes, and the summary names
each with its reason.  Each case runs in a nested session with this
suite's conftest."""
from __future__ import annotations

import pytest

from helpers import nested_session

SKIPS = '''
import pytest

def test_runs():
    pass

def test_allowed():
    pytest.skip("no-setuid: the probe said: setpriv failed")
'''

UNEXPECTED = {
    "skip": 'def test_x():\n    pytest.skip("not today")\n',
    "importorskip": 'def test_x():\n    pytest.importorskip("no_such_module_anywhere")\n',
    "skipif": '@pytest.mark.skipif(True, reason="never here")\ndef test_x():\n    pass\n',
    "module": 'pytest.importorskip("no_such_module_anywhere")\n\ndef test_x():\n    pass\n',
}


@pytest.mark.timeout(90)
def test_an_allowed_skip_passes_and_is_named(tmp_path):
    rc, text = nested_session(tmp_path, "test_allowed.py", SKIPS, 70)
    assert rc == 0 and "1 passed, 1 skipped" in text, text
    assert "1 skipped, each for an allowed reason (conftest.ALLOWED_SKIPS)" in text, text
    assert "test_allowed.py::test_allowed: Skipped: no-setuid: the probe said: setpriv failed" in text, text


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", sorted(UNEXPECTED))
def test_any_other_skip_fails_the_session(tmp_path, how):
    rc, text = nested_session(tmp_path, "test_unexpected.py", "import pytest\n\n" + UNEXPECTED[how], 70)
    assert rc == 1, text
    assert "1 skipped for a reason not in conftest.ALLOWED_SKIPS: the session fails" in text, text
