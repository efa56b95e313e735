from methods.eval_shards import (autoattack_identity, check_shards, final_shard_files,
                                 previous_stage_files)

# Sharded AutoAttack (evaluation.autoattack.shards, methods/eval_shards.py): a bad shard count
# stops the workflow here, before any job, naming the field, the value and what is allowed.
for _recipe in sorted({cell[3] for cell in CELLS}):
    check_shards(resolve_evaluation(config, _recipe, RECIPES),
                 f" (recipe {_recipe!r}'s evaluation merged over the config's)")


def _cell_of(w):
    return cell_dir(RESULTS, w.dataset, w.arch, w.method, _recipe_of(w), w.seed)


def autoattack_shard_files(w):
    """The evaluate rule's extra inputs: [] unless evaluation.autoattack.shards > 1 (so the
    unsharded DAG is unchanged), else the last AutoAttack stage's K shard files and the PGD parts."""
    return final_shard_files(_cell_of(w), w.checkpoint,
                             resolve_evaluation(config, _recipe_of(w), RECIPES))


def previous_autoattack_stage(w):
    return previous_stage_files(_cell_of(w), w.checkpoint,
                                resolve_evaluation(config, _recipe_of(w), RECIPES), w.part)


def autoattack_shard_identity(w):
    """A shard job's parameter: the part of the evaluation identity AutoAttack depends on, so a
    new entry in evaluation.attacks reruns the merge, not the shards."""
    return json.dumps(autoattack_identity(resolve_evaluation(config, _recipe_of(w), RECIPES),
                                          w.part), sort_keys=True)


rule evaluate:
    """Clean accuracy, the configured attacks and AutoAttack (on a recorded stratified subset) for
    one checkpoint, under the evaluation identity taken from the workflow config; with
    evaluation.autoattack.shards > 1, the AutoAttack block is merged from the shard jobs."""
    input:
        train=f"{CELL}/train.json",
        weights=f"{CELL}/checkpoints/{{checkpoint}}.pt",
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
        shards=autoattack_shard_files,
    output:
        f"{CELL}/eval_{{checkpoint}}.json",
    params:
        evaluation=evaluation_identity,
    threads: config["threads"]
    resources:
        gpu=1,
    conda:
        "../../envs/advrepro.conda.yaml"
    log:
        f"{CELL}/logs/evaluate_{{checkpoint}}.log",
    shell:
        "{PY} -m methods evaluate --train-result {input.train:q} --checkpoint {wildcards.checkpoint} "
        "--evaluation {params.evaluation:q} "
        "--data-dir {DATA:q} --prepared-dir {RESULTS}/data/{wildcards.dataset} "
        "--autoattack-shards {input.shards:q} "
        "--result {output:q} " + WHERE + " > {log} 2>&1"


rule evaluate_autoattack_shard:
    """One job of a sharded AutoAttack evaluation (methods/eval_shards.py): stage<s> runs the
    s-th sub-attack on shard i's whole batches of the examples the previous stage left robust;
    pgd runs the compare PGD on part i's batches.  Resumable from its .partial/ folder."""
    input:
        train=f"{CELL}/train.json",
        weights=f"{CELL}/checkpoints/{{checkpoint}}.pt",
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
        previous=previous_autoattack_stage,
    output:
        f"{CELL}/aa_{{checkpoint}}/{{part}}-shard{{shard}}of{{shards}}.json",
    params:
        identity=autoattack_shard_identity,
    wildcard_constraints:
        part=r"stage[1-9][0-9]*|pgd",
        shard=r"\d+",
        shards=r"\d+",
    threads: config["threads"]
    resources:
        gpu=1,
    conda:
        "../../envs/advrepro.conda.yaml"
    log:
        f"{CELL}/logs/aa_{{checkpoint}}_{{part}}-shard{{shard}}of{{shards}}.log",
    shell:
        "{PY} -m methods evaluate-shard --train-result {input.train:q} "
        "--checkpoint {wildcards.checkpoint} --evaluation {params.identity:q} "
        "--part {wildcards.part} --shard {wildcards.shard} --shards {wildcards.shards} "
        "--previous {input.previous:q} "
        "--data-dir {DATA:q} --prepared-dir {RESULTS}/data/{wildcards.dataset} "
        "--result {output:q} " + WHERE + " > {log} 2>&1"
