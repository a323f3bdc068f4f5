# Tables (and their plots) from run records, the claims from the tables, then Snakemake's own
# HTML report of them all: results/report.html (report-<experiments>.html for a partial plan).


rule tables:
    input:
        W.run_metrics,
    output:
        # update(): Snakemake keeps the committed folder while the job runs and puts it back if
        # the job fails, instead of deleting it (the stage itself swaps files in only at the end).
        report(
            update(directory(f"{W.results}/tables/{{experiment}}")),
            patterns=["{plot}.png"],
            category="{experiment}",
            caption="../docs/report/plot.rst",
            labels={"plot": "{plot}"},
        ),
    log:
        f"{W.results}/reports/tables-{{experiment}}.log",
    params:
        py=W.python,
        common=W.common_args,
        run_ids=W.run_id_list,
        record=lambda w: f"{W.results}/reports/tables-{w.experiment}",
        # Unused by the command: a new requirements.lock changes this param, and Snakemake then
        # rebuilds the tables, whose `lock` column compares each record with the lock.
        lock=W.lock_sha256,
    # Seconds of work: on a cluster, not worth a job's queueing and status polling.
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "{params.py} -m gemvlab.stages.tables experiment={wildcards.experiment} {params.common} "
        "'report.run_ids=[{params.run_ids}]' hydra.run.dir={params.record} > {log} 2>&1"


rule claims:
    input:
        tables=expand(f"{W.results}/tables/{{experiment}}", experiment=W.experiments),
        claims=expand("experiments/{experiment}/claims.yaml", experiment=W.all_experiments),
    output:
        md=f"{W.results}/CLAIMS.md",
        html=report(
            f"{W.results}/CLAIMS.html",
            category="Claims",
            caption="../docs/report/claims.rst",
            labels={"page": "claims, every experiment"},
        ),
    log:
        f"{W.results}/reports/claims.log",
    params:
        py=W.python,
        common=W.common_args,
        record=f"{W.results}/reports/claims",
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        # Every experiment's claims, from the tables present: a plan of some experiments
        # rewrites their sections and keeps the others'.
        "{params.py} -m gemvlab.stages.claims {params.common} "
        "hydra.run.dir={params.record} > {log} 2>&1"


rule report:
    input:
        tables=expand(f"{W.results}/tables/{{experiment}}", experiment=W.experiments),
        claims=f"{W.results}/CLAIMS.html",
    output:
        W.report_file,
    log:
        f"{W.results}/reports/report.log",
    params:
        py=W.python,
        config=W.report_args,
    localrule: True
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        # The report reads the finished jobs' metadata; no lock, since this job holds it.
        "{params.py} -m snakemake --nolock --report {output} {params.config} > {log} 2>&1"
