"""Stage drift: an experiment's tables from its committed records against the same tables from
a rerun of them (`snakemake verify`), cell by cell -> results/drift/<experiment>.csv and .md."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gemvlab.error_line import to_caller
from gemvlab.errors import GemvlabError
from gemvlab.files import atomic_write_text
from gemvlab.paths import safe_child
from gemvlab.stage import StageContext, stage
from gemvlab.stages.tables import planned_run_ids


@stage("drift")
def drift(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from gemvlab.results.drift import counts, drift_table, render_markdown, summary_line
    from gemvlab.results.tables import load_record

    exp = cfg.experiment.id
    fresh_results = cfg.report.get("fresh_results")
    if not fresh_results:
        raise GemvlabError("drift needs +report.fresh_results=<the folder the runs were rerun "
                           "into>: run it as snakemake verify")
    # [run_id, why] pairs: the runs this machine could not rerun (the Snakefile passes them).
    not_rerun = {str(rid): str(why) for rid, why in cfg.report.get("not_rerun") or []}
    results = Path(cfg.paths.results)
    runs = safe_child(results / "runs", exp, "experiment.id")
    fresh_runs = safe_child(Path(fresh_results) / "runs", exp, "experiment.id")
    committed = [load_record(safe_child(runs, rid, "report.run_ids entry"))
                 for rid in planned_run_ids(cfg)]
    fresh = {rec.run_id: load_record(fresh_runs / rec.run_id) for rec in committed
             if rec.run_id not in not_rerun}
    specs = OmegaConf.to_container(cfg.experiment.tables, resolve=True)
    table = drift_table(committed, fresh, specs, not_rerun)
    summary = summary_line(exp, table)
    out = results / "drift"
    atomic_write_text(out / f"{exp}.csv", table.to_csv(index=False, lineterminator="\n"))
    atomic_write_text(out / f"{exp}.md", render_markdown(exp, table, summary))
    to_caller(f"gemvlab verify: {summary}")  # on the terminal, not only in the job's log
    return {"runs_rerun": len(fresh), **counts(table)}


if __name__ == "__main__":
    drift()
