# `snakemake verify` (rule verify, in the Snakefile): the runs this machine can run again, by the
# run rules of rules/stages.smk into verify_results (default <results>/verify/), then one drift
# table per experiment: its tables from the committed records against the same tables from the
# fresh ones, cell by cell, timed columns left out -> <results>/drift/<experiment>.csv|md.


rule drift:
    input:
        committed=W.run_metrics,
        fresh=W.verify_metrics,
    output:
        csv=report(
            f"{W.results}/drift/{{experiment}}.csv",
            category="drift",
            caption="../docs/report/drift.rst",
            labels={"experiment": "{experiment}", "file": "csv (every cell)"},
        ),
        md=report(
            f"{W.results}/drift/{{experiment}}.md",
            category="drift",
            caption="../docs/report/drift.rst",
            labels={"experiment": "{experiment}", "file": "md (cells that differ)"},
        ),
    log:
        f"{W.results}/reports/drift-{{experiment}}.log",
    params:
        py=W.python,
        common=W.common_args,
        verify=W.drift_args,
        record=lambda w: f"{W.results}/reports/drift-{w.experiment}",
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "{params.py} -m gemvlab.stages.drift experiment={wildcards.experiment} {params.common} "
        "{params.verify} hydra.run.dir={params.record} > {log} 2>&1"


rule verify_report:
    input:
        expand(f"{W.results}/drift/{{experiment}}.csv", experiment=W.experiments),
    output:
        W.verify_report_file,
    log:
        f"{W.results}/reports/report-verify.log",
    params:
        py=W.python,
        config=W.report_args,
    localrule: True
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        # As rule report does, for the target verify: its DAG holds the drift tables.
        "{params.py} -m snakemake --nolock --report {output} verify {params.config} > {log} 2>&1"
