"""The smoke report of every experiment, as a reader sees it in a browser.

It reuses the experiments' runs when their tests ran first in the same session (the same
results folder); alone, it runs their smoke plans itself.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from gemvlab.config import REPO_ROOT, experiment_ids
from tests.experiments.smoke import Setup, config, config_args, snakemake
from tests.report_browser import Report, browser, require_chromium


def test_report_shows_the_claims_and_every_experiments_plots(setup: Setup, tmp_path: Path):
    require_chromium()
    experiments = experiment_ids()
    threads = [] if setup.real else ["--max-threads", "1"]
    proc = snakemake(*threads, f"{setup.results}/report.html",
                     *config_args(config(",".join(experiments), setup)))
    assert proc.returncode == 0, proc.stderr[-5000:]
    first_claims = {exp: yaml.safe_load((REPO_ROOT / "experiments" / exp / "claims.yaml")
                                        .read_text())["claims"][0]["id"]
                    for exp in experiments}
    with browser(tmp_path / "chromium") as driver:
        report = Report(driver, setup.results / "report.html")
        assert set(report.categories()) >= {"Claims", *experiments}
        for exp in experiments:
            assert report.open_category(exp) >= 1, exp
            report.show_first()
            assert report.shown_png_width() > 100, exp
            report.back_to_results()
        assert report.open_category("Claims") == 1
        report.show_first()
        text = report.shown_html_text()
    assert "Summary" in text and "not testable at this scale" in text
    for exp, claim_id in first_claims.items():
        assert claim_id in text, (exp, claim_id)
