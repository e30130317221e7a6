"""The command line, as a new user runs it."""

from __future__ import annotations

import re

import pytest

from apscheduler_mongo.__main__ import main


class TestDemo:
    """``python -m apscheduler_mongo demo`` runs schedules and reports them."""

    def test_demo_in_process(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("MONGODB_URI", raising=False)
        assert main(["demo", "--seconds", "2.2"]) == 0
        output = capsys.readouterr().out
        assert "mongomock-motor" in output
        ran = re.findall(r"success: job from schedule '(every-[a-z-]+)'", output)
        assert ran.count("every-second") >= 2
        assert ran.count("every-two-seconds") >= 1
        assert re.search(r"done: \d+ jobs ran", output)

    @pytest.mark.wire
    def test_demo_over_the_wire(
        self, capsys: pytest.CaptureFixture[str], wire_uri: str
    ) -> None:
        database = "apscheduler_mongo_test_demo"
        assert (
            main(
                ["demo", "--uri", wire_uri, "--database", database, "--seconds", "1.6"]
            )
            == 0
        )
        output = capsys.readouterr().out
        assert "127.0.0.1" in output or "MONGODB_URI" not in output
        assert "success: job from schedule 'every-second'" in output

    def test_bad_uri_is_a_clear_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["demo", "--uri", "http://example.invalid"]) == 2
        assert "must start with 'mongodb://'" in capsys.readouterr().err

    def test_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exc_info:
            main(["demo", "--help"])

        assert exc_info.value.code == 0
        assert "MONGODB_URI" in capsys.readouterr().out
