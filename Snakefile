"""advrepro: prepare_data -> train -> evaluate -> aggregate (-> bench).

    snakemake --cores all --resources gpu=4                        # the default (embedded) run
    snakemake --cores all --configfile workflow/config/paper.yaml  # the published matrix
    snakemake --cores 1 results/mnist5k/smallcnn-w0.5/nfgsm/nfgsm_mnist/seed0/eval_last.json

Every output path is keyed by dataset, arch, method, recipe and seed, so any single cell can be
asked for by its path.  See README.md.
"""
import json
import sys

from snakemake.utils import min_version, validate

min_version("9.0")
sys.path.insert(0, workflow.basedir)

from methods.config import (cell_dir, eval_checkpoints, iter_cells, load_recipes,
                            recipe_annotations, resolve_cell, resolve_evaluation)
from methods.config_checks import check_config

# The embedded default, unless a --configfile is given: then that file alone (plus --config),
# never merged into the default (its datasets and evaluation keys would leak in).
if not workflow.overwrite_configfiles:
    configfile: "workflow/config/default.yaml"
# Before any rule exists: one message naming the field, the value and what is allowed (the
# schema's errors rephrased, then recipes, method_args, names, cells, attacks); then the defaults.
check_config(config)
validate(config, "workflow/schemas/config.schema.yaml")

PY = sys.executable
RESULTS = config["results_dir"]
DATA = config["data_dir"]
RECIPES = load_recipes(config)
CELLS = list(iter_cells(config))
CELL = RESULTS + "/{dataset}/{arch}/{method}/{recipe}/seed{seed}"
# Where a job runs, not what it computes: in the shell command, never in params, so changing
# them reruns nothing (the profile's rerun-triggers leave out `code`).
WHERE = (f"--device {config['device']} --threads {{threads}} "
         f"--meter {json.dumps(config['meter'])} --device-slots {RESULTS}/.device_slots")

wildcard_constraints:
    dataset=r"[^/]+",
    arch=r"[^/]+",
    method=r"[^/]+",
    recipe=r"[^/]+",
    seed=r"\d+",
    checkpoint=r"last|best",


def _recipe_of(w):
    recipe = RECIPES.get(w.recipe)
    if recipe is None:
        raise ValueError(f"unknown recipe {w.recipe!r} in path; known: {sorted(RECIPES)}")
    if recipe["method"] != w.method:
        raise ValueError(f"recipe {w.recipe!r} is method {recipe['method']!r}, not {w.method!r}")
    return w.recipe


def training_identity(w):
    """The train rule's one parameter: what determines the weights (methods.config.resolve_cell)."""
    return json.dumps(resolve_cell(config, w.dataset, w.arch, _recipe_of(w), int(w.seed), RECIPES),
                      sort_keys=True)


def train_priority(w):
    """A scheduling hint, nothing computed depends on it: longer trainings start first, so a run
    does not end waiting on one long job while the other cores idle.  The length is estimated
    from the recipe as epochs x (1 + attack steps x copies) (PGD-40: 41 per epoch, BB m = 5: 6)."""
    cell = resolve_cell(config, w.dataset, w.arch, _recipe_of(w), int(w.seed), RECIPES)
    args = cell.get("method_args") or {}
    steps, copies = args.get("steps", 1), args.get("m", 1)
    steps = steps if isinstance(steps, int) else 1
    copies = copies if isinstance(copies, int) else 1
    return int(cell["train"]["epochs"]) * (1 + steps * copies)


def evaluation_identity(w):
    """The evaluate rule's parameter (methods.config.resolve_evaluation): changing it
    re-evaluates without retraining."""
    return json.dumps(resolve_evaluation(config, _recipe_of(w), RECIPES), sort_keys=True)


def annotations():
    """Recipes' paper / notes / published links, for the tables only."""
    return json.dumps(recipe_annotations(RECIPES, [cell[3] for cell in CELLS]), sort_keys=True)


def all_evaluations():
    return [f"{cell_dir(RESULTS, *cell)}/eval_{ckpt}.json"
            for cell in CELLS for ckpt in eval_checkpoints(config)]


# The HTML report (`snakemake --report <file>.html`, or --report-after-run at the end of a run):
# this description, then every table and figure the rules wrap in report(...).
report: "workflow/report/workflow.rst"


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/measure.smk"

localrules: all, aggregate


rule all:
    input:
        f"{RESULTS}/tables/{config['run_name']}.md",
        f"{RESULTS}/tables/{config['run_name']}.csv",
        f"{RESULTS}/tables/masking/{config['run_name']}.md",
        f"{RESULTS}/tables/masking/{config['run_name']}.csv",
        f"{RESULTS}/plots/eps_curves/{config['run_name']}.png",
        f"{RESULTS}/plots/eps_curves/{config['run_name']}.pdf",
        f"{RESULTS}/plots/eps_curves/{config['run_name']}.csv",
        rules.paper_tables.output,
        rules.claims.output,
        rules.plots.output,
        rules.report_tables_html.output,
