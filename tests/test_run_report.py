"""The run report (elborl/report.py): one self-contained HTML page per run, opened in a real headless browser
(Debian's chromium, installed by scripts/setup.sh). The browser takes a screenshot, says whether every image
decoded and logs every console message; a page that is blank, has a broken image or logs to the console fails,
and a second test breaks a page each of those ways to show that the check does fail."""

from dataclasses import dataclass
from pathlib import Path
import re
import shutil
import subprocess

import pytest
import torch
from PIL import Image

from elborl.evaluate import EvalConfig, evaluate, write_evaluation
from elborl.geneval.prompts import shapes_test_set
from elborl.models.shapes_model import ShapesFlowModel
from elborl.report import git_commit, write_run_report
from elborl.rl import group_diversity
from elborl.rounds import HeldOut, RunContext, evaluation_uri
from elborl.store import ArtifactStore

from conftest import TINY
from test_rl_loop import small_config, tiny_run

BROWSER = shutil.which("chromium")
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no chromium: run scripts/setup.sh as root "
                                   "(apt-get install -y --no-install-recommends chromium)")
TEST_PROMPTS = shapes_test_set()[::6]  # 12 prompts, 2 per task
TINY_EVALUATION = EvalConfig(images_per_prompt=2, steps=2)

# Appended to a copy of the page (the report itself carries no script): once the page has loaded, the browser's
# own verdict on every image goes into the title, which --dump-dom reads back.
IMAGE_CHECK = """<script>window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const decoded = images.filter(image => image.complete && image.naturalWidth > 0).length;
  document.title = "images decoded: " + decoded + "/" + images.length;
});</script>"""


@dataclass
class BrowserView:
    screenshot: Path
    decoded: int | None  # None: the check never ran
    images: int | None
    console: list[str]  # every console message (uncaught errors included)

    def blank(self) -> bool:
        """Nearly every pixel one colour: nothing was drawn."""
        with Image.open(self.screenshot) as image:
            pixels = image.convert("RGB")
            counts = pixels.getcolors(pixels.width * pixels.height)
        return max(count for count, _ in counts) > 0.99 * pixels.width * pixels.height

    def problems(self) -> list[str]:
        found = ["blank page"] if self.blank() else []
        if self.decoded is None or self.decoded != self.images:
            found.append(f"images decoded: {self.decoded}/{self.images}")
        return found + [f"console: {line}" for line in self.console]


def open_in_browser(page: Path, scratch: Path) -> BrowserView:
    """The page in headless chromium: a 1280 x 2000 screenshot, the image check and the console messages."""
    scratch.mkdir(parents=True, exist_ok=True)
    checked = scratch / "checked.html"
    checked.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    screenshot = scratch / "screenshot.png"
    result = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={scratch / 'profile'}", "--enable-logging=stderr", "--v=0", f"--screenshot={screenshot}",
         "--window-size=1280,2000", "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and screenshot.exists(), result.stderr[-3000:]
    verdict = re.search(r"<title>images decoded: (\d+)/(\d+)</title>", result.stdout)
    decoded, images = (int(verdict[1]), int(verdict[2])) if verdict else (None, None)
    return BrowserView(screenshot, decoded, images, [line for line in result.stderr.splitlines() if ":CONSOLE" in line])


def held_out(backbone):
    return evaluate(backbone, TEST_PROMPTS, TINY_EVALUATION, progress=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A tiny real run (2 rounds, held-out evaluations before and after every round) and its report."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("report") / "run"
    ctx = tiny_run(run, small_config(epochs=2), held_out=HeldOut(held_out, every=1))
    return write_run_report(ctx, run / "report.html", base_model="tiny shapes model (seed 0)",
                            prompts="shapes test set, every 6th prompt")


# --- the page in a browser -------------------------------------------------------------------------------------
@needs_browser
def test_the_report_renders_in_a_browser_with_every_image_and_no_console_message(report, tmp_path):
    html = report.read_text()
    # self-contained: every image inline, nothing fetched from anywhere
    assert not re.search(r"(src|href)=\"(?!data:)", html) and "http://" not in html and "https://" not in html
    for section in ("Training reward and held-out score", "Per task, before and after",
                    "Samples on the same prompts and seeds", "Reward-hacking monitors", "Settings", "Lineage"):
        assert f"<h2>{section}</h2>" in html
    for row in ("held-out score (strict)", "training reward", "KL to the reference", "diversity within groups",
                "git commit", "base model", "prompt set", "params hash"):
        assert f"<th>{row}</th>" in html, row
    assert "rl.group_size</code> = <code>3" in html and "tiny shapes model (seed 0)" in html

    view = open_in_browser(report, tmp_path)
    assert view.problems() == []
    assert view.images == html.count("<img ") >= 4  # charts, per-task bars, the before/after grid, monitors
    print(f"\nscreenshot: {view.screenshot}")


def first_image_src(html: str) -> str:
    return re.search(r'src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', html)[1]


BREAKAGES = {  # a way to break the page -> what the check must then say
    "undecodable image": (lambda html: html.replace(first_image_src(html), "data:image/png;base64,AAAAnotapng", 1),
                          "images decoded:"),
    "missing image": (lambda html: html.replace(first_image_src(html), "nowhere.png", 1), "images decoded:"),
    "console error": (lambda html: html.replace("</body>", "<script>notDefinedAnywhere();</script></body>"),
                      "Uncaught ReferenceError: notDefinedAnywhere"),
    "blank page": (lambda html: "<!doctype html><html><head><title>x</title></head><body></body></html>",
                   "blank page"),
}


@needs_browser
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_the_browser_check_fails_on_a_broken_page(report, tmp_path, breakage):
    breaks, expected = BREAKAGES[breakage]
    page = tmp_path / "broken.html"
    page.write_text(breaks(report.read_text()))
    problems = open_in_browser(page, tmp_path).problems()
    assert any(expected in problem for problem in problems), problems


# --- what the page is made of ----------------------------------------------------------------------------------
def test_a_run_without_its_own_evaluations_compares_the_given_ones(tmp_path):
    """As the DVC report stage and the campaign flow do: the run has no held-out evaluations; two evaluation
    artifacts (the base model's and the final policy's) are compared, and their manifests give the lineage."""
    torch.set_num_threads(1)
    ctx = tiny_run(tmp_path / "run", small_config(epochs=2))
    model = ShapesFlowModel.from_config(TINY, seed=0)

    def write(directory):
        write_evaluation(directory, *held_out(model))

    for name in ("base", "final"):  # the same model twice: the same images on the same seeds
        ArtifactStore().publish(str(tmp_path / "eval" / name), write, {"stage": "evaluate", "model": str(
            tmp_path / "base"), "prompts": "shapes_geneval"})
    html = write_run_report(RunContext(ctx.run, None), tmp_path / "report.html", str(tmp_path / "eval" / "base"),
                            str(tmp_path / "eval" / "final")).read_text()
    assert "<title>Run report" in html and html.count("<img ") == 4
    assert "base 0.000 → final 0.000 (+0.000" in html  # the same model on the same seeds: no change at all
    assert f"<code>{tmp_path / 'base'}</code>" in html and "<code>shapes_geneval</code>" in html
    assert "rl.epochs</code> = <code>2" in html  # the settings the run recorded (run.json)


def test_the_report_reads_a_run_in_s3(tmp_path, s3_env):
    s3_env.create_bucket("reports")
    torch.set_num_threads(1)
    ctx = tiny_run("s3://reports/run", small_config(epochs=1), held_out=HeldOut(held_out))
    assert ctx.store.exists(evaluation_uri(ctx.run, 1))
    html = write_run_report(RunContext(ctx.run, None, cache=tmp_path / "cache"), tmp_path / "report.html").read_text()
    assert "<code>s3://reports/run</code>" in html and html.count("<img ") == 4
    assert list((tmp_path / "cache").glob("artifacts/*/grid.png"))  # the evaluations came through the local cache


def test_a_run_that_is_not_there_is_an_error_not_an_empty_page(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run there"):
        write_run_report(str(tmp_path / "no-such-run"), tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()


def test_lineage_says_unknown_outside_a_git_checkout(tmp_path):
    assert git_commit(tmp_path) == "unknown (not a git checkout)"
    assert re.fullmatch(r"[0-9a-f]{40}( \+ uncommitted changes)?", git_commit())


def test_diversity_within_groups_is_the_rms_distance_between_a_groups_samples():
    x0 = torch.zeros(4, 3, 2, 2)
    x0[1] += 2.0  # group 0: two samples 2 apart in every element; group 1: two identical samples
    assert group_diversity(x0, [0, 0, 1, 1]) == pytest.approx(1.0)  # (2 + 0) / 2
    assert group_diversity(x0[2:], [0, 0]) == 0.0
