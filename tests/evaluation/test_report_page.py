"""report.html: the verdict rules, every section's fallback note, the page in a real headless Chromium, and the
evaluation's hparams session in TensorBoard."""

from __future__ import annotations

import copy
import html
import json
import os
import shutil
from pathlib import Path

import pytest

import evaluate_synthetic
from pixcell_ext.evaluation.html_report import REPORT_FILE, render_report
from pixcell_ext.evaluation.verdicts import (
    closer_than_baseline,
    low_data_verdict,
    memorisation_verdict,
    sign_of_interval,
)
from pixcell_ext.generation.manifest import MANIFEST_FILE, read_manifest, write_manifest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL_HINT = (
    "The report's browser test needs Debian's headless Chromium and its driver: `make browser` (as root: "
    "apt-get install -y chromium chromium-driver) and `pip install -r requirements-dev.txt` (selenium)."
)
METRIC_NAMES = ("FD", "KID", "precision", "recall", "density", "coverage", "TSTR", "TRTR", "LPIPS")


def estimate(value, low, high, n=10):
    return {"value": value, "low": low, "high": high, "n": n}


def space(fd, n=36):
    return {"distribution": {"overall": {"n": n, "fd": fd}}}


@pytest.fixture(scope="module")
def tiny_evaluation(tiny_stack, tmp_path_factory) -> Path:
    """One real `evaluate_synthetic.py --preset tiny` run: metrics.json, plots, report.html and logs."""
    out = tmp_path_factory.mktemp("evaluation") / "out"
    argv = ["--preset", "tiny", "--tiny_dir", str(tiny_stack.data.parent), "--output_dir", str(out)]
    evaluate_synthetic.main(evaluate_synthetic.parse_args(argv))
    return out


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def page_text(metrics: dict, out: Path, **kwargs) -> str:
    return html.unescape(render_report(metrics, out, **kwargs).read_text())


# ---------------------------------------------------------------------------------------------- verdict rules


@pytest.mark.parametrize(
    ("low", "high", "sign"),
    [(0.01, 0.2, "above"), (-0.1, 0.2, "straddles"), (-0.3, -0.01, "below"), (None, 1, "unknown")],
)
def test_sign_of_interval(low, high, sign):
    assert sign_of_interval(low, high) == sign


@pytest.mark.parametrize(
    ("real", "plus", "answer", "tone"),
    [
        (estimate(0.50, 0.45, 0.55), estimate(0.70, 0.65, 0.75), "Yes", "good"),  # gain in [0.10, 0.30]
        (estimate(0.50, 0.45, 0.55), estimate(0.52, 0.47, 0.57), "Not shown", "mixed"),  # gain in [-0.08, 0.12]
        (estimate(0.70, 0.65, 0.75), estimate(0.50, 0.45, 0.55), "No", "bad"),  # gain in [-0.30, -0.10]
        (estimate(0.50, None, None), estimate(0.70, None, None), "Not known", "unknown"),
    ],
)
def test_low_data_verdict_reads_the_gain_interval_at_the_smallest_k(real, plus, answer, tone):
    noise = {"k": 50, "real": estimate(0.9, 0.1, 0.95), "real_plus_synthetic": estimate(0.1, 0.05, 0.2)}
    extractors = {
        "colour_histogram": {"low_data": {"points": [{"k": 5, "real": plus, "real_plus_synthetic": real}]}},
        "timm:judge": {"low_data": {"points": [noise, {"k": 10, "real": real, "real_plus_synthetic": plus}]}},
    }
    verdict = low_data_verdict(extractors)
    assert verdict.answer.startswith(answer) and verdict.tone == tone
    assert "k = 10" in verdict.detail and "timm:judge" in verdict.detail


def test_low_data_verdict_skips_a_space_whose_probe_is_already_perfect():
    perfect = {"k": 1, "real": estimate(1.0, 1.0, 1.0), "real_plus_synthetic": estimate(0.99, 0.97, 1.0)}
    helped = {"k": 1, "real": estimate(0.7, 0.65, 0.75), "real_plus_synthetic": estimate(0.8, 0.77, 0.83)}
    helped["gain"] = estimate(0.1, 0.05, 0.15)
    extractors = {"timm:judge": {"low_data": {"points": [perfect]}}, "uni": {"low_data": {"points": [helped]}}}
    verdict = low_data_verdict(extractors)
    assert verdict.tone == "good" and "(uni probe)" in verdict.detail and "Not read in timm:judge" in verdict.detail
    extractors["uni"]["low_data"]["points"] = [perfect]  # nowhere to gain: read in the first space, as before
    assert "(timm:judge probe)" in low_data_verdict(extractors).detail


def test_low_data_verdict_prefers_a_gain_interval_of_its_own():
    point = {"k": 10, "real": estimate(0.5, 0.4, 0.6), "real_plus_synthetic": estimate(0.6, 0.5, 0.7)}
    assert low_data_verdict({"uni": {"low_data": {"points": [point]}}}).tone == "mixed"  # intervals overlap
    point["gain"] = estimate(0.1, 0.05, 0.15)  # a paired interval (issue 20) is narrower than the two separate ones
    assert low_data_verdict({"uni": {"low_data": {"points": [point]}}}).tone == "good"


def test_closer_than_baseline_needs_a_baseline_equal_n_and_a_clear_interval():
    ours = {"uni": space(estimate(10.0, 8.0, 12.0)), "timm:judge": space(estimate(5.0, 4.0, 6.0))}
    assert closer_than_baseline(ours, None).answer == "Not known"
    further = {"extractors": {"uni": space(estimate(30.0, 25.0, 35.0)), "timm:judge": space(estimate(3.0, 2.5, 3.5))}}
    verdict = closer_than_baseline(ours, further)  # read in the independent encoder, not in UNI2-h
    assert verdict.tone == "bad" and "timm:judge" in verdict.detail
    closer = {"extractors": {"timm:judge": space(estimate(9.0, 7.0, 11.0))}}
    assert closer_than_baseline(ours, closer).tone == "good"
    level = {"extractors": {"timm:judge": space(estimate(5.5, 4.5, 6.5))}}
    assert closer_than_baseline(ours, level).tone == "mixed"
    other_n = {"extractors": {"timm:judge": space(estimate(9.0, 7.0, 11.0), n=100)}}
    assert "Matched n differs" in closer_than_baseline(ours, other_n).detail


def test_memorisation_verdict():
    assert memorisation_verdict({"skipped": "pass --train_data_dir"}).detail == "pass --train_data_dir"
    assert memorisation_verdict(None).answer == "Not checked"
    found = {"possible_copies": estimate(0.2, 0.15, 0.25), "expected_by_chance": 0.01, "flagged": True}
    assert memorisation_verdict(found).tone == "bad"
    assert memorisation_verdict({**found, "flagged": False}).tone == "good"


# ---------------------------------------------------------------------------------------------- the page


def test_report_of_a_real_run_shows_each_class_metric_and_skipped_part(tiny_evaluation):
    metrics = metrics_of(tiny_evaluation)
    text = html.unescape((tiny_evaluation / REPORT_FILE).read_text())
    for name in metrics["classes"]:
        assert f'id="class-{name}"' in text
    for name in (*METRIC_NAMES, *metrics["extractors"]):
        assert name in text, name
    assert "Feature space inception skipped: Inception skipped" in text.replace("<b>", "").replace("</b>", "")
    assert metrics["memorisation"]["skipped"] in text and metrics["lpips"]["skipped"] in text
    assert "STAND-IN" in text and "UNI2-h's terms" in text and "Not known" in text
    assert "covers its expected value at that n" in text and "What the intervals cover: " in text  # issue 20
    shown = min(8, metrics["counts"]["synthetic"]["ADI"]) * len(metrics["classes"])
    assert text.count('alt="generated ') == text.count('alt="reference ') == shown  # with the manifest's references
    assert text.count('alt="VAE round trip ') == sum(metrics["vae_floor"]["counts"].values())  # 2 per class
    floor_rows = len(metrics["vae_floor"]["extractors"]) * (len(metrics["classes"]) + 1)  # per class and overall
    assert text.count(": VAE floor</td>") == floor_rows and metrics["vae_floor"]["note"] in text
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained, no script


def test_each_missing_part_is_a_visible_note_not_a_broken_page(tiny_evaluation, tmp_path):
    metrics = metrics_of(tiny_evaluation)
    synthetic = tmp_path / "synthetic"
    shutil.copytree(metrics["config"]["synthetic_dir"], synthetic)
    rows = read_manifest(synthetic)
    for row in rows:
        if row["class"] == "TUM":
            row["reference"] = "none"
    write_manifest(synthetic, rows)
    bare = copy.deepcopy(metrics)
    bare["config"]["synthetic_dir"] = os.path.relpath(synthetic)  # relative, as a command line gives it
    for name in ("memorisation", "lpips", "skipped_extractors", "counts"):
        del bare[name]
    bare["extractors"]["uni"]["probe"] = bare["extractors"]["uni"]["low_data"] = None
    del bare["extractors"]["uni"]["distribution"]["TUM"]
    bare["fls_score"] = {"uni": estimate(1.0, 0.5, 1.5)}  # a field this page does not know
    out = tmp_path / "out"
    out.mkdir()  # no plots
    text = page_text(bare, out)
    assert "No reference tiles for this class" in text.split('id="class-TUM"')[1].split('id="class-')[0]
    assert text.count("No reference tiles for this class") == 1
    assert "not measured for this class" in text
    assert "The memorisation section is missing" in text and "LPIPS was not computed." in text
    assert "metrics.json also holds fls_score" in text

    (synthetic / MANIFEST_FILE).unlink()
    bare["config"]["real_dir"] = str(tmp_path / "gone")
    bare["extractors"] = {}
    text = page_text(bare, out)
    assert "No manifest.csv beside the synthetic tiles" in text and 'alt="reference ' not in text
    assert "The real folder" in text and "No real tiles of this class were found." in text
    assert "No feature space with distribution metrics was computed." in text
    assert "The probes did not run" in text and "No low-data curve" in text

    (synthetic / "generation_config.json").unlink()
    assert "how they were made is not recorded" in page_text({}, out)  # even an empty metrics dict renders


def test_memorisation_and_lpips_sections_show_their_numbers_and_the_pairs_image(tiny_evaluation, tmp_path):
    metrics = metrics_of(tiny_evaluation)
    metrics["memorisation"] = {
        "possible_copies": estimate(0.25, 0.2, 0.3, 36), "expected_by_chance": 0.01, "p_value": 1e-9,
        "flagged": True, "feature_space": "timm:x", "n_training": 90, "n_held_out": 18,
    }  # fmt: skip
    lpips = {"generated_pairs": estimate(0.4, 0.3, 0.5), "real_pairs": estimate(0.45, 0.35, 0.55)}
    metrics["lpips"] = {"net": "alex", "per_class": {"ADI": lpips}}
    out = tmp_path / "out"
    shutil.copytree(tiny_evaluation / "plots", out / "plots")
    text = page_text(metrics, out)
    assert "Possibly: look at the closest pairs" in text and "25 % [20 %, 30 %]" in text
    assert "plots/memorisation_pairs.png) is missing" in text  # the tiny run drew none
    assert "0.4 [0.3, 0.5]" in text and "n/a" in text  # generated_to_reference absent: n/a, not an error


# ---------------------------------------------------------------------------------------------- in a browser


def open_in_chromium(page: Path, screenshot: Path, profile: Path) -> dict:
    """Load ``page`` in headless Chromium; return its console errors, broken images, class sections and text."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found. {INSTALL_HINT}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed. {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", "--window-size=1200,900",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(page.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images, i => [i.alt, i.complete && i.naturalWidth > 0])"
        )
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1200, min(height, 16000))
        driver.save_screenshot(str(screenshot))
        return {
            "errors": [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")],
            "images": images,
            "classes": driver.execute_script("return Array.from(document.querySelectorAll('div.class'), d => d.id)"),
            "text": driver.execute_script("return document.body.innerText"),
        }
    finally:
        driver.quit()


def test_report_opens_in_chromium_without_errors_or_broken_images(tiny_evaluation, tmp_path):
    metrics = metrics_of(tiny_evaluation)
    screenshot = tmp_path / "report.png"
    seen = open_in_chromium(tiny_evaluation / REPORT_FILE, screenshot, tmp_path / "profile")
    assert seen["errors"] == []
    tiles = 3 * min(8, metrics["counts"]["synthetic"]["ADI"]) * len(metrics["classes"])  # real, generated, reference
    round_trips = sum(metrics["vae_floor"]["counts"].values())
    assert len(seen["images"]) == tiles + round_trips + len(metrics["plots"])
    assert [alt for alt, loaded in seen["images"] if not loaded] == []
    assert seen["classes"] == [f"class-{name}" for name in metrics["classes"]]
    for name in METRIC_NAMES:
        assert name in seen["text"], name
    assert screenshot.stat().st_size > 10_000


def test_a_broken_image_and_a_script_error_are_caught(tiny_evaluation, tmp_path):
    page = tmp_path / "broken.html"
    text = (tiny_evaluation / REPORT_FILE).read_text()
    page.write_text(
        text.replace("</main>", '<img src="missing.png" alt="gone"><script>undefinedCall()</script></main>')
    )
    seen = open_in_chromium(page, tmp_path / "broken.png", tmp_path / "profile")
    assert [alt for alt, loaded in seen["images"] if not loaded] == ["gone"]
    assert any("undefinedCall" in e["message"] for e in seen["errors"])


# ---------------------------------------------------------------------------------------------- TensorBoard


def test_headline_numbers_and_settings_reach_tensorboards_hparams(tiny_evaluation):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    metrics = metrics_of(tiny_evaluation)
    events = EventAccumulator(str(tiny_evaluation / "logs"))
    events.Reload()
    fd = metrics["extractors"]["uni"]["distribution"]["overall"]["fd"]["value"]
    assert events.Scalars("uni/fd")[-1].value == pytest.approx(fd, rel=1e-6)
    tstr = metrics["extractors"]["uni"]["probe"]["TSTR"]["balanced_accuracy_ci"]["value"]
    assert events.Scalars("uni/TSTR")[-1].value == pytest.approx(tstr, rel=1e-6)
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    config = json.loads((Path(metrics["config"]["synthetic_dir"]) / "generation_config.json").read_text())
    assert start.hparams["generation/seed"].number_value == config["seed"]


def test_hparams_carry_the_training_runs_configuration_found_through_the_lora_dir(tmp_path):
    from pixcell_ext.evaluation.tensorboard_logs import run_hparams

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "training_config.json").write_text(json.dumps({"learning_rate": 1e-4, "rank": [4]}))
    config = {"seed": 3, "guidance_scale": 1.5, "scheduler": "dpm", "sources": {"lora_dir": str(tmp_path / "run")}}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert run_hparams(tmp_path) == {
        "generation/seed": 3,
        "generation/guidance_scale": 1.5,
        "generation/scheduler": "dpm",
        "generation/lora_dir": str(tmp_path / "run"),
        "training/learning_rate": 1e-4,
        "training/rank": "[4]",  # hparams take scalars and strings
    }
    assert run_hparams(tmp_path / "nowhere") == {}
