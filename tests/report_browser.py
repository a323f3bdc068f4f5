"""Snakemake's HTML report, opened and clicked through in Debian's headless Chromium."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without the background-networking flags Chromium keeps calling Google's hosts, which this
# closed network refuses.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000"]


def require_chromium() -> None:
    """Skip where no browser is installed, except in CI (`.ci/run` installs it)."""
    if shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER):
        return
    message = ("needs Debian's chromium and chromium-driver: "
               "apt-get install chromium chromium-driver")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def browser(user_data: Path) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={user_data}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Report:
    """The report's menu as a reader uses it: a category, then a result's eye button."""

    def __init__(self, driver, path: Path) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.wait = WebDriverWait(driver, 30)
        driver.get(path.resolve().as_uri())
        self._links("Claims")

    def _links(self, text: str) -> list:
        from selenium.webdriver.common.by import By

        return self.wait.until(lambda d: d.find_elements(By.LINK_TEXT, text))

    def categories(self) -> list[str]:
        """The category links under RESULTS on the landing menu."""
        from selenium.webdriver.common.by import By

        links = self.driver.find_elements(By.TAG_NAME, "a")
        return [a.text for a in links if a.text and a.text not in ("Workflow", "Statistics",
                                                                    "About")]

    def open_category(self, name: str) -> int:
        """Click a category; return how many results it lists."""
        from selenium.webdriver.common.by import By

        self._links(name)[0].click()
        return len(self.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR,
                                                            "a[iconname=eye]")))

    def show_first(self) -> None:
        """Click the first result's eye button once the menu has settled: while the menu's
        transition runs, a click can land on the row that is sliding under the button."""
        from selenium.common.exceptions import (
            ElementClickInterceptedException,
            StaleElementReferenceException,
        )
        from selenium.webdriver.common.by import By

        def clicked(driver) -> bool:
            try:
                driver.find_elements(By.CSS_SELECTOR, "a[iconname=eye]")[0].click()
            except (ElementClickInterceptedException, StaleElementReferenceException):
                return False
            return True

        self.wait.until(clicked)

    def shown_png_width(self) -> int:
        """Pixel width of the PNG now shown, once the browser has decoded it."""
        from selenium.webdriver.common.by import By

        def decoded(d) -> int:
            return max([d.execute_script("return arguments[0].complete ? "
                                         "arguments[0].naturalWidth : 0", img)
                        for img in d.find_elements(By.TAG_NAME, "img")
                        if (img.get_attribute("src") or "").startswith("data:image/png")]
                       or [0])

        return self.wait.until(decoded)

    def shown_html_text(self) -> str:
        """The text of the HTML page now shown in the report's frame."""
        from selenium.webdriver.common.by import By

        frame = self.wait.until(lambda d: d.find_elements(By.TAG_NAME, "iframe"))[0]
        self.driver.switch_to.frame(frame)
        try:
            return self.wait.until(lambda d: d.find_element(By.TAG_NAME, "body").text)
        finally:
            self.driver.switch_to.default_content()

    def back_to_results(self) -> None:
        self._links("Results")[0].click()
