# Models and datasets, fetched once into resources/ and checked by sha256 whenever loaded.


rule fetch_model:
    output:
        f"{W.resources}/models/{{model}}/manifest.json",
    log:
        f"{W.resources}/logs/fetch_model-{{model}}.log",
    params:
        py=W.python,
        model=W.model_args,
        common=W.fetch_args,
        folder=lambda w: f"{W.resources}/models/{w.model}",
    threads: 1
    resources:
        mem_mb=6000,
        runtime=20,
    shell:
        "{params.py} -m gemvlab.stages.fetch_model {params.model} {params.common} "
        "hydra.run.dir={params.folder} > {log} 2>&1"


rule fetch_data:
    output:
        f"{W.resources}/data/{{dataset}}/manifest.json",
    log:
        f"{W.resources}/logs/fetch_data-{{dataset}}.log",
    params:
        py=W.python,
        common=W.fetch_args,
        folder=lambda w: f"{W.resources}/data/{w.dataset}",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.py} -m gemvlab.stages.fetch_data data={wildcards.dataset} {params.common} "
        "hydra.run.dir={params.folder} > {log} 2>&1"
