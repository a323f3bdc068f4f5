"""Plots declared as config and drawn from tables: tiny frames here, then every committed table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from gemvlab.config import REPO_ROOT, compose, experiment_ids, to_plain
from gemvlab.errors import GemvlabError
from gemvlab.results.plots import DPI, draw, save_png, write_plots
from gemvlab.results.tables import read_tables

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 150_000


def throughput() -> dict[str, pd.DataFrame]:
    """Two models x two systems x three batches, in an order that is not the natural one."""
    rows = [{"model": model, "system": system, "batch": batch,
             "tokens_per_s": batch * (2.0 if system == "neupims" else 1.0) * scale}
            for model, scale in (("gpt3-13b", 0.5), ("gpt3-7b", 1.0))
            for system in ("npu", "neupims") for batch in (256, 32, 64)]
    return {"throughput": pd.DataFrame(rows)}


LINE = {"table": "throughput", "x": "batch", "y": "tokens_per_s", "hue": "system",
        "facet": "model", "logx": True, "title": "Throughput"}


def test_line_with_hue_and_facet_writes_a_png(tmp_path: Path):
    fig = draw("tput", LINE, throughput())
    path = tmp_path / "tput.png"
    save_png(fig, path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    width, height = fig.get_size_inches()
    with Image.open(path) as image:
        assert image.size == (round(width * DPI), round(height * DPI))
    # One subplot per model, in natural order (7b before 13b), each with one line per system.
    assert [ax.get_title() for ax in fig.axes] == ["model = gpt3-7b", "model = gpt3-13b"]
    for ax in fig.axes:
        assert len(ax.get_lines()) == 2
        assert list(ax.get_lines()[0].get_xdata()) == [32, 64, 256]  # sorted along x
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["neupims", "npu"]


def test_two_saves_are_byte_identical(tmp_path: Path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    save_png(draw("tput", LINE, throughput()), first)
    save_png(draw("tput", LINE, throughput()), second)
    assert first.read_bytes() == second.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # the temp files were renamed away


def test_unknown_key_names_the_key_and_the_known_keys():
    with pytest.raises(GemvlabError, match="unknown key") as err:
        draw("tput", {**LINE, "colour": "red"}, throughput())
    message = str(err.value)
    assert "'colour'" in message and "'hue'" in message and "\n" not in message


def test_missing_column_names_the_column_and_the_table_columns():
    with pytest.raises(GemvlabError, match="column 'tokens_s'") as err:
        draw("tput", {**LINE, "y": "tokens_s"}, throughput())
    assert "'tput'" in str(err.value) and "'tokens_per_s'" in str(err.value)


def test_missing_table_is_an_error():
    with pytest.raises(GemvlabError, match="table 'speed'"):
        draw("tput", {**LINE, "table": "speed"}, throughput())


@pytest.mark.parametrize("tables", [
    {"throughput": throughput()["throughput"].iloc[0:0]},
    {"throughput": pd.DataFrame({"run_id": [], "model": []})},  # a pattern table without runs
])
def test_no_rows_still_writes_a_figure_that_says_so(tmp_path: Path, tables):
    fig = draw("tput", LINE, tables)
    assert [t.get_text() for t in fig.axes[0].texts] == ["no rows at this scale"]
    save_png(fig, tmp_path / "tput.png")
    assert (tmp_path / "tput.png").read_bytes().startswith(PNG_SIGNATURE)


def test_a_where_that_selects_nothing_gives_the_no_rows_figure():
    fig = draw("tput", {**LINE, "where": "model == 'gpt3-175b'"}, throughput())
    assert [t.get_text() for t in fig.axes[0].texts] == ["no rows at this scale"]


def test_rows_sharing_a_point_are_an_error():
    spec = {k: v for k, v in LINE.items() if k != "facet"}  # two models on each point
    with pytest.raises(GemvlabError, match="rows share one point"):
        draw("tput", spec, throughput())


def test_grouped_bars_centre_the_hues_present_in_each_category():
    df = pd.DataFrame({"bits": ["2b", "2b", "32b"], "impl": ["glvq", "rtn", "dense"],
                       "tokens_per_s": [1.0, 2.0, 3.0]})
    spec = {"table": "speed", "kind": "bar", "x": "bits", "y": "tokens_per_s", "hue": "impl"}
    ax = draw("speed", spec, {"speed": df}).axes[0]
    centres = sorted(round(p.get_x() + p.get_width() / 2, 6) for p in ax.patches)
    assert centres == [-0.2, 0.2, 1.0]  # 2b: two bars side by side; 32b: one, on its tick
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2b", "32b"]


@pytest.mark.parametrize("spec, message", [
    ({"table": "throughput", "x": "batch"}, "required"),
    ({**LINE, "kind": "pie"}, "kind 'pie'"),
    ({**LINE, "logy": "yes"}, "'logy' must be true or false"),
    ({**LINE, "kind": "bar"}, "logx does not apply to bars"),
    ({**LINE, "x": "system", "hue": None, "where": "batch == 32"}, "logx needs a numeric x"),
    ({**LINE, "where": "nonexistent > 1"}, "where"),
])
def test_bad_specs_are_errors(spec, message):
    with pytest.raises(GemvlabError, match=message):
        draw("tput", spec, throughput())


def declared(exp: str) -> tuple[dict, dict[str, pd.DataFrame]]:
    """An experiment's plot specs and its committed tables, read as the claims read them."""
    cfg = compose([f"experiment={exp}"])
    specs = OmegaConf.to_container(cfg.experiment.get("plots") or {}, resolve=True)
    return specs, read_tables(REPO_ROOT / "results" / "tables" / exp)


@pytest.mark.parametrize("exp", experiment_ids())
def test_every_declared_plot_draws_from_the_committed_tables(tmp_path: Path, exp: str):
    specs, tables = declared(exp)
    assert 2 <= len(specs) <= 4, f"{exp} declares {len(specs)} plots"
    for name, spec in specs.items():
        # A table with rows, so the columns were checked, not excused as a smaller scale's.
        assert not tables[spec["table"]].empty, f"{exp}/{name}: table {spec['table']} is empty"
        fig = draw(name, spec, tables)
        assert not any(ax.texts for ax in fig.axes), f"{exp}/{name} drew no rows"
        save_png(fig, tmp_path / f"{name}.png")
        assert len((tmp_path / f"{name}.png").read_bytes()) < MAX_PNG_BYTES


def test_the_stage_writes_one_png_per_declared_plot(tmp_path: Path):
    out = tmp_path / "tables" / "neupims"
    shutil.copytree(REPO_ROOT / "results" / "tables" / "neupims", out)
    for png in out.glob("*.png"):
        png.unlink()
    cfg = compose(["experiment=neupims"])
    assert write_plots(to_plain(cfg)["experiment"], out) == len(cfg.experiment.plots)
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(cfg.experiment.plots)
