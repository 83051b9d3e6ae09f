"""The demo's report (no engine): the table reads metasd_stats defensively, the PNG is
written, and the quiet mode sends what child processes write to the log file."""
import subprocess
import sys

from vllm_metasd.demo import drafter_rows, format_report, plot_share_per_domain, quiet


def test_report_table_with_missing_and_none_fields():
    stats = {"drafters": {
        "code": {"chosen": 3, "drafted": 12, "accepted": 9, "acceptance_rate": 0.75,
                 "mean_reward": 0.8},
        "lookup": {"chosen": 1, "drafted": 0, "accepted": 0, "acceptance_rate": None,
                   "mean_reward": None},
        "old": {"chosen": 0, "drafted": 4, "accepted": 1, "reward_count": 2,
                "reward_sum": 1.0}}}  # derived fields absent: recomputed
    assert drafter_rows(stats) == [("code", "75%", "0.75", "0.800"),
                                   ("lookup", "25%", "-", "-"),
                                   ("old", "0%", "0.25", "0.500")]
    report = format_report(640, 10.0, 8.0, True, stats)
    assert "1.25x" in report and "yes" in report and "code" in report
    assert "NO" in format_report(640, 10.0, 8.0, False, None)  # no statistics: no rows


def test_arm_share_png(tmp_path):
    png = plot_share_per_domain({"code": {"code": 6, "general": 2, "lookup": 0},
                                 "math": {"code": 0, "general": 1, "lookup": 3}},
                                tmp_path / "share.png", {"code": 2, "math": 1})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quiet_sends_child_output_to_the_log(tmp_path, capfd):
    log = tmp_path / "demo.log"
    with quiet(log):
        subprocess.run([sys.executable, "-c",
                        "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"])
    out, err = capfd.readouterr()
    assert "to stdout" not in out and "to stderr" not in err
    assert "to stdout" in log.read_text() and "to stderr" in log.read_text()
