"""Progress of long loops: a redrawn bar on a terminal, a log line every 10 % otherwise."""

from __future__ import annotations

import io
import logging

from harc_hpc.progress import Progress


def test_terminal_gets_one_redrawn_bar():
    out = io.StringIO()
    with Progress(4, "solve", stream=out, tty=True, width=8) as bar:
        for i in range(4):
            bar.update(1, f"residual {10.0 ** -i:.0e}")
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and "\n" not in text[:-1]
    assert "solve [########] 4/4" in text and "residual 1e-03" in text


def test_a_log_file_gets_a_line_per_tenth_and_no_carriage_returns(caplog):
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="harc_hpc.progress"):
        with Progress(200, "capture", stream=out, tty=False) as bar:
            for _ in range(200):
                bar.update(1)
    assert out.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[0].startswith("capture: 20/200") and lines[-1].startswith("capture: 200/200")


def test_stopping_early_logs_what_was_done(caplog):
    with caplog.at_level(logging.INFO, logger="harc_hpc.progress"):
        bar = Progress(1000, "cg", tty=False)
        for i in range(250):
            bar.update(1, f"residual {1.0 / (i + 1):.1e}")
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [l.split(" after")[0] for l in lines] == ["cg: 100/1000", "cg: 200/1000", "cg: 250/1000"]
    assert "(residual 5.0e-03)" in lines[1] and "(residual 4.0e-03)" in lines[-1]
