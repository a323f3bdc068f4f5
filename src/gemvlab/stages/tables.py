"""Stage tables: rebuild results/tables/<experiment>/ from run records, never by hand, and
draw the experiment's plots (experiment.plots) from those tables."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gemvlab.config import plan_experiment
from gemvlab.errors import GemvlabError
from gemvlab.files import staged_folder
from gemvlab.paths import safe_child
from gemvlab.stage import StageContext, stage


def planned_run_ids(cfg: DictConfig) -> list[str]:
    """The runs the Snakefile passed, or (ad hoc) the experiment's plan at this scale."""
    if cfg.report.run_ids is not None:
        return [str(r) for r in cfg.report.run_ids]
    extra = [f"scale={cfg.scale.name}", f"paths.results={cfg.paths.results}"]
    return [run.run_id for run in plan_experiment(cfg.experiment.id, extra)]


@stage("tables")
def tables(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from gemvlab.results.plots import write_plots
    from gemvlab.results.source import lock_hash
    from gemvlab.results.tables import build_table, load_record, write_table

    exp = cfg.experiment.id
    results = Path(cfg.paths.results)
    runs = safe_child(results / "runs", exp, "experiment.id")
    records = [load_record(safe_child(runs, rid, "report.run_ids entry"))
               for rid in planned_run_ids(cfg)]
    if not records:
        raise GemvlabError(f"experiment {exp} declares no runs: add experiment.runs")
    out_dir = safe_child(results / "tables", exp, "experiment.id")
    metrics: dict[str, float] = {"runs": len(records)}
    lock = lock_hash()
    built = {}
    # Built aside and swapped in at the end: a failure leaves the committed tables as they were.
    with staged_folder(out_dir) as staging:
        for name, spec in cfg.experiment.tables.items():
            spec_plain = OmegaConf.to_container(spec, resolve=True)
            built[name] = build_table(records, spec_plain, lock)
            write_table(built[name], staging, name, title=spec_plain.get("title"),
                        note=spec_plain.get("note"))
            metrics[f"rows_{name}"] = len(built[name])
        metrics["plots"] = write_plots(OmegaConf.to_container(cfg.experiment, resolve=True),
                                       staging)
    for name, df in built.items():
        ctx.tracker.log_table(f"{exp}/{name}", df, [out_dir / f"{name}.csv",
                                                    out_dir / f"{name}.md"])
    return metrics


if __name__ == "__main__":
    tables()
