"""The HTML run report (`captioner.training.report`): rendered in headless Chromium, and the
same numbers for a run in the model store as for the local folder."""
from tests.helpers import headless_chromium


def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    from captioner.training.report import write_report

    path, metrics = write_report(str(trained_run.out_dir), tmp_path / "report.html")
    assert {"train_loss", "val_loss", "val_CIDEr_best", "pairs_per_s_per_gpu", "cost_usd_measured",
            "cost_usd_estimated"} <= set(metrics), metrics
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium("1300,900")
    try:
        driver.get(path.resolve().as_uri())
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return [...document.images].every(i => i.complete)"))
        widths = driver.execute_script("return [...document.querySelectorAll('img.curve')].map(i => i.naturalWidth)")
        titles = [e.get_attribute("alt") for e in driver.find_elements(By.CSS_SELECTOR, "img.curve")]
        assert len(widths) >= 4 and all(w > 0 for w in widths), (titles, widths)
        assert {"Loss", "Learning rate", "Validation caption metrics", "Throughput per GPU"} <= set(titles)
        rows = driver.find_elements(By.CSS_SELECTOR, "#metrics tr")
        text = "\n".join(r.text for r in rows)
        assert "pairs/s per GPU" in text and "cost so far, measured" in text, text
        assert "vit_tiny_patch16_224" in driver.find_element(By.ID, "config").text
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 0
        print(f"screenshot: {shot}")
    finally:
        driver.quit()


def test_report_of_a_run_in_the_store(trained_run, s3_server, monkeypatch, tmp_path, capsys):
    """`captioner report s3://...`: the same numbers as for the local folder."""
    from captioner.cli.main import main
    from captioner.io.storage import publish
    from captioner.training.report import _fetch_run, run_metrics

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    uri = "s3://models/runs/tiny"
    publish(trained_run.out_dir, uri)
    monkeypatch.chdir(tmp_path)
    assert main(["report", uri]) in (0, None)
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out == str(tmp_path / "tiny-report.html")
    local = run_metrics(_fetch_run(str(trained_run.out_dir), tmp_path / "local", None))
    assert run_metrics(_fetch_run(uri, tmp_path / "s3", None)) == local
