"""`prolip report` on hand-written records: aggregation over seeds and datasets, base-to-new harmonic means as the
paper takes them, group rows, paper numbers only on an exact match, cells that could not be scored, numeric
ordering of lr and λ, and the plots (one colour scale, captioned error bars)."""

import csv
import json
import re

import pytest
from click.testing import CliRunner

from prolip.bench.reference import ELEVEN, OOD, PAPER_TEMPLATES
from prolip.bench.report import aggregate, format_number, markdown, sensitivity_figure, shots_figure, write_report
from prolip.cli import main

TEN_SEEDS = tuple(range(1, 11))


def prolip_hp(lr=1e-5, lam="1/N", precision="reference", **extra):
    return {
        "lr": lr,
        "lam": lam,
        "steps": 300,
        "precision": precision,
        "grid": False,
        "grid_chunk": None,
        "tie_rule": "first",
        **extra,
    }


def rec(
    dataset,
    seed,
    acc,
    *,
    protocol="fewshot",
    model="RN50",
    weights="openai",
    random=False,
    label="prolip",
    method="prolip",
    shots=1,
    hp=None,
    templates=None,
    **extra,
):
    return {
        "protocol": protocol,
        "model": model,
        "weights": weights,
        "random_weights": random,
        "sampler": "lpp",
        "templates_name": "dataset",
        "templates": list(templates or PAPER_TEMPLATES.get(dataset, ["{}."])),
        "source": None,
        "label": label,
        "method": method,
        "shots": shots,
        "dataset": dataset,
        "seed": seed,
        "views": 300,
        "aug_seed": 0,
        "validation": False,
        "setting": None,
        "fingerprint": "f",
        "group": None,
        "accuracy": acc,
        "hyperparameters": prolip_hp() if hp is None else hp,
        **extra,
    }


def eleven(seeds=TEN_SEEDS, datasets=ELEVEN, **kw):
    return [rec(d, s, 60.0 + s / 10 + i, **kw) for i, d in enumerate(sorted(datasets)) for s in seeds]


def _average(rows, **match):
    return next(r for r in rows if r["kind"] == "average" and all(r.get(k) == v for k, v in match.items()))


def _dataset_row(rows, dataset, **match):
    return next(
        r
        for r in rows
        if r["kind"] == "dataset" and r["dataset"] == dataset and all(r.get(k) == v for k, v in match.items())
    )


# ----------------------------------------------------------------------------------------------- aggregation


def test_mean_and_std_over_seeds_then_over_datasets():
    rows = aggregate([rec("A", 1, 60.0), rec("A", 2, 62.0), rec("B", 1, 70.0), rec("B", 2, 80.0)])
    a = _dataset_row(rows, "A")
    assert (a["mean"], a["std"], a["seeds"]) == (61.0, 1.0, [1, 2])
    avg = _average(rows)
    assert avg["dataset"] == "average (2)" and avg["mean"] == pytest.approx(68.0)
    assert avg["std"] == pytest.approx(3.0)  # per-seed averages 65 and 71
    # Swap B's seeds: per-dataset stds unchanged (1 and 5, mean 3), per-seed averages now 70 and 66.
    rows = aggregate([rec("A", 1, 60.0), rec("A", 2, 62.0), rec("B", 1, 80.0), rec("B", 2, 70.0)])
    assert _average(rows)["std"] == pytest.approx(2.0)


def test_one_seed_has_no_spread_to_show():
    rows = aggregate([rec("A", 1, 60.0), rec("B", 1, 70.0)])
    assert _dataset_row(rows, "A")["std"] is None and _average(rows)["std"] is None
    assert not any("±" in line for line in markdown(rows).splitlines() if line.startswith("|"))


def test_base2new_harmonic_mean_of_the_averaged_accuracies_not_of_each_seed():
    # Per seed (base, new): A (80, 40), (60, 80); B (90, 50), (70, 70).
    def b2n(dataset, seed, base, new):
        hm = 2 * base * new / (base + new)
        return rec(dataset, seed, hm, protocol="base2new", base=base, new=new, hm=hm)

    rows = aggregate([b2n("A", 1, 80, 40), b2n("A", 2, 60, 80), b2n("B", 1, 90, 50), b2n("B", 2, 70, 70)])
    a = _dataset_row(rows, "A")
    assert (a["base"], a["new"]) == (70, 60)
    assert a["hm"] == pytest.approx(2 * 70 * 60 / 130)  # 64.62, the paper's way
    assert a["hm_seed_mean"] == pytest.approx((2 * 80 * 40 / 120 + 2 * 60 * 80 / 140) / 2)  # 60.95, secondary
    assert a["mean"] == a["hm"] and a["accuracy"] == a["hm"]
    avg = _average(rows)
    assert (avg["base"], avg["new"]) == (75, 60)
    assert avg["hm"] == pytest.approx(2 * 75 * 60 / 135)  # 66.67: HM of the dataset-averaged base and new ...
    b = _dataset_row(rows, "B")
    assert avg["hm"] != pytest.approx((a["hm"] + b["hm"]) / 2)  # ... not the mean of per-dataset HMs (66.60)
    assert avg["hm_seed_mean"] == pytest.approx((a["hm_seed_mean"] + b["hm_seed_mean"]) / 2)
    table = markdown(rows)
    assert "70.00 ± 10.00 / 60.00 ± 20.00 / 64.62" in table and "75.00 ± 10.00 / 60.00 ± 15.00 / 66.67" in table


def _lr_group(
    lam="1/N",
    precision="reference",
    group="prolip λ=1/N, mean over lr",
    lrs=(1e-2, 1e-3, 1e-4, 1e-5),
    shots=1,
    datasets=ELEVEN,
):
    out = []
    for k, lr in enumerate(lrs):
        hp = prolip_hp(lr=lr, lam=lam, precision=precision)
        out += eleven(label=f"prolip lr {lr:g} {lam} {precision}", hp=hp, group=group, shots=shots, datasets=datasets)
        for r in out[-len(datasets) * len(TEN_SEEDS) :]:
            r["accuracy"] += k  # lr k adds k points everywhere
    return out


def test_group_rows_average_their_members_per_dataset_and_over_datasets():
    rows = aggregate(_lr_group())
    group = _dataset_row(rows, "Caltech101", kind="dataset", label="prolip lr 0.01 1/N reference")
    assert group["group"] == "prolip λ=1/N, mean over lr"
    mean_row = next(r for r in rows if r["kind"] == "group" and r["dataset"] == "Caltech101")
    assert mean_row["label"] == "prolip λ=1/N, mean over lr" and mean_row["mean"] == pytest.approx(group["mean"] + 1.5)
    assert mean_row["varying"] == {"lr": [1e-5, 1e-4, 1e-3, 1e-2]} and "lr" not in mean_row["hyperparameters"]
    assert mean_row["std"] == pytest.approx(group["std"])  # every member moves with the seed alike
    avg = _average(rows, label="prolip λ=1/N, mean over lr")
    member_avgs = [r["mean"] for r in rows if r["kind"] == "average" and r.get("of") == "dataset"]
    assert len(member_avgs) == 4 and avg["mean"] == pytest.approx(sum(member_avgs) / 4)


def test_the_paper_lr_average_matches_the_group_row_and_only_it():
    records = []
    for shots in (1, 16):
        records += _lr_group(shots=shots)
        records += _lr_group(precision="fp32", group="prolip λ=1/N, mean over lr, float32", shots=shots)
        records += _lr_group(lam="1/N2", group="prolip λ=1/N², mean over lr", shots=shots)
    rows = aggregate(records)
    lr_average = {64.33, 75.46}
    shown = [r for r in rows if r.get("paper") in lr_average]
    assert [(r["kind"], r["label"], r["shots"]) for r in shown] == [
        ("average", "prolip λ=1/N, mean over lr", 1),
        ("average", "prolip λ=1/N, mean over lr", 16),
    ]
    # The lr 1e-5 member keeps its own number; the group's rows per dataset get none.
    assert _average(rows, label="prolip lr 1e-05 1/N reference", shots=1)["paper"] == 64.28
    assert not any(r.get("paper") for r in rows if r["kind"] == "group")
    # A group over three of the four lrs is not the paper's average.
    rows = aggregate(_lr_group(lrs=(1e-3, 1e-4, 1e-5)))
    assert "paper" not in _average(rows, label="prolip λ=1/N, mean over lr")


# ----------------------------------------------------------------------------------------------- exact matches


def _with(records, **changes):
    return [{**r, **changes} for r in records]


def _one_template_changed(records):
    return [{**r, "templates": ["a photo of a {}."]} if r["dataset"] == "DescribableTextures" else r for r in records]


DIFFERENCES = {
    "precision fp32": lambda rs: _with(rs, hyperparameters=prolip_hp(precision="fp32")),
    "backbone": lambda rs: _with(rs, model="ViT-B-16"),
    "random weights": lambda rs: _with(rs, random_weights=True),
    "other weights": lambda rs: _with(rs, weights="/path/to/rn50.safetensors"),
    "protocol": lambda rs: _with(rs, protocol="fewshot-val"),
    "sampler": lambda rs: _with(rs, sampler="coop"),
    "seeds 1-9": lambda rs: [r for r in rs if r["seed"] != 10],
    "seeds 1-11": lambda rs: rs + [{**r, "seed": 11} for r in rs if r["seed"] == 10],
    "seeds 0-9": lambda rs: [{**r, "seed": r["seed"] - 1} for r in rs],
    "templates": _one_template_changed,
    "method": lambda rs: _with(rs, method="linear-adapter"),
    "lr": lambda rs: _with(rs, hyperparameters=prolip_hp(lr=1e-4)),
    "lambda": lambda rs: _with(rs, hyperparameters=prolip_hp(lam="1/N2")),
    "steps": lambda rs: _with(rs, hyperparameters=prolip_hp(steps=200)),
    "an extra hyperparameter": lambda rs: _with(rs, hyperparameters=prolip_hp(warmup=10)),
    "views": lambda rs: _with(rs, views=20),
    "validation": lambda rs: _with(rs, validation=True),
    "shots": lambda rs: _with(rs, shots=3),
    "ten datasets": lambda rs: [r for r in rs if r["dataset"] != "EuroSAT"],
    "twelve datasets": lambda rs: rs + [{**r, "dataset": "ImageNetV2"} for r in rs if r["dataset"] == "ImageNet"],
}


def test_the_paper_number_is_shown_on_the_exact_setting():
    avg = _average(aggregate(eleven()))
    assert avg["paper"] == 64.28 and "2410.05270" in avg["paper_source"]
    assert _average(aggregate(eleven(shots=16)))["paper"] == 75.20
    # The batching of the validation grid is not part of the setting.
    assert _average(aggregate(eleven(hp=prolip_hp(grid_chunk=7))))["paper"] == 64.28


@pytest.mark.parametrize("difference", DIFFERENCES)
def test_any_one_difference_removes_the_paper_number(difference):
    rows = aggregate(DIFFERENCES[difference](eleven()))
    assert not any(r.get("paper") for r in rows)
    assert not re.search(r"\(paper \d", markdown(rows))


def test_per_dataset_zero_shot_and_test_time_references():
    imagenet = _dataset_row(aggregate(eleven(shots=16)), "ImageNet")
    assert imagenet["paper"] == 64.48
    assert "paper" not in _dataset_row(aggregate(eleven(shots=16, hp=prolip_hp(precision="fp32"))), "ImageNet")
    zs = _average(aggregate(eleven(label="zeroshot", method="zeroshot", hp={}, shots=8)))
    assert zs["paper"] == 58.89
    tta_setting = {"tta": {"views": 64, "ratio": 0.1, "steps": 1, "lr": 1e-4, "seed": 0, "max_images": None}}
    tta = [
        rec(
            d,
            None,
            50.0 + i,
            protocol="tta",
            label="tta+zeroshot",
            method="zeroshot",
            shots=0,
            hp={},
            setting=tta_setting,
        )
        for i, d in enumerate(["ImageNet", *sorted(OOD)])
    ]
    rows = aggregate(tta)
    assert _average(rows, subset="ImageNet variants")["paper"] == 47.44
    assert "paper" not in _average(rows, subset=None)  # the paper quotes no five-dataset average
    assert _dataset_row(rows, "ImageNet")["paper"] == 62.00
    capped = {"tta": {**tta_setting["tta"], "max_images": 1000}}
    assert not any(r.get("paper") for r in aggregate(_with(tta, setting=capped)))


def test_base2new_references_need_their_templates():
    def b2n(**kw):
        return [
            rec(d, s, 80.0, protocol="base2new", model="ViT-B-16", shots=16, base=85.0, new=75.0, hm=79.69, **kw)
            for d in sorted(ELEVEN)
            for s in TEN_SEEDS
        ]

    avg = _average(aggregate(b2n()))
    assert (avg["paper_base"], avg["paper_new"], avg["paper_hm"]) == (84.01, 73.86, 78.61)
    single = _average(aggregate(b2n(templates=["a photo of a {}."], templates_name="single")))
    assert single.get("paper_hm") == 79.08 and "paper_base" not in single
    # Templates are compared string by string, whatever the run called them.
    renamed = _average(aggregate(b2n(templates=["a photo of a {}."])))
    assert renamed.get("paper_hm") == 79.08 and "paper_base" not in renamed
    other = _average(aggregate(b2n(templates=["a photo of the {}."], templates_name="single")))
    assert not any(k.startswith("paper_") for k in other)


# ----------------------------------------------------------------------------------------------- not scored


def test_cells_that_could_not_be_scored_are_labelled_and_kept_out_of_averages():
    records = eleven(seeds=(1, 2))
    records += [
        rec(
            d,
            s,
            None if d == "EuroSAT" else 50.0,
            label="tip-adapter",
            method="tip-adapter",
            hp={},
            note="tip-adapter cannot score another dataset's classes" if d == "EuroSAT" else None,
        )
        for d in sorted(ELEVEN)
        for s in (1, 2)
    ]
    rows = aggregate(records)
    tip = _average(rows, label="tip-adapter")
    assert tip["mean"] is None and "EuroSAT" in tip["missing"][0] and "cannot score" in tip["missing"][0]
    table = markdown(rows)
    assert "nan" not in table and "not scored¹" in table and "not shown²" in table
    assert "- ¹ tip-adapter cannot score another dataset's classes" in table
    assert "- ² average not shown: EuroSAT: not scored (tip-adapter cannot score" in table
    assert _average(rows, label="prolip")["mean"] is not None


def test_a_partly_scored_dataset_is_flagged_and_blocks_the_average():
    records = eleven(seeds=(1, 2, 3))
    records[0] = {**records[0], "accuracy": None, "note": "diverged"}  # first dataset, seed 1
    rows = aggregate(records)
    first = _dataset_row(rows, records[0]["dataset"])
    assert first["accuracy_scored"] == 2 and first["mean"] == pytest.approx(60.25)
    assert _average(rows)["mean"] is None
    table = markdown(rows)
    assert "60.25 ± 0.05¹" in table and "mean of the 2 of 3 seeds scored; the others: diverged" in table


def test_an_average_is_only_over_the_tables_datasets():
    records = eleven(seeds=(1, 2)) + [
        r for r in eleven(seeds=(1, 2), label="other", method="zeroshot", hp={}) if r["dataset"] != "ImageNet"
    ]
    rows = aggregate(records)
    other = _average(rows, label="other")
    assert other["mean"] is None and other["missing"] == ["no records for ImageNet"]
    assert other["datasets"] == sorted(ELEVEN)


# ----------------------------------------------------------------------------------------------- order, plots


def test_lr_and_lambda_are_sorted_numerically():
    assert [format_number(x) for x in (1e-5, 1e-2, 0.0, 0.3, 1.0, 10, "1/N")] == [
        "1e-5",
        "1e-2",
        "0",
        "0.3",
        "1",
        "10",
        "1/N",
    ]
    lrs, lams = (1e-2, 1e-6, 1e-4), (1.0, 0.0, 1e-1)
    records = [
        rec(d, s, 50.0, protocol="sensitivity", hp=prolip_hp(lr=lr, lam=lam))
        for d in ("A", "B")
        for s in (1, 2)
        for lr in lrs
        for lam in lams
    ]
    records += [
        rec("A", s, 50.0, label=f"p {lam}", hp=prolip_hp(lam=lam)) for s in (1, 2) for lam in ("1/N", 0.5, "1/N2", 1e-3)
    ]  # rules keep their run order, after the numbers
    table = markdown(aggregate(records))
    assert "| lr \\ λ | 0 | 1e-1 | 1 |" in table
    lines = [line.split(" |")[0] for line in table.splitlines() if line.startswith("| 1e-") and "±" in line]
    assert lines[:3] == ["| 1e-6", "| 1e-4", "| 1e-2"]
    order = [line.split(" |")[0][2:] for line in table.splitlines() if line.startswith("| p ")]
    assert order[:4] == ["p 0.001", "p 0.5", "p 1/N", "p 1/N2"]
    sweep = [line.split(" |")[0][2:] for line in table.splitlines() if line.startswith("| prolip λ=")]
    assert sweep[:4] == ["prolip λ=0 lr=1e-6", "prolip λ=0 lr=1e-4", "prolip λ=0 lr=1e-2", "prolip λ=1e-1 lr=1e-6"]


def test_the_heatmap_has_one_colour_scale_and_one_labelled_colour_bar():
    records = [
        rec(
            d,
            s,
            40.0 + 100 * lr * (1 + k) + lam,
            protocol="sensitivity",
            shots=k,
            hp=prolip_hp(lr=lr, lam=lam, precision=p),
            label=f"prolip {p}",
        )
        for d in ("A", "B")
        for s in (1, 2)
        for k in (1, 4)
        for lr in (1e-3, 1e-2)
        for lam in (0.0, 1.0)
        for p in ("reference", "fp32")
    ]
    fig = sensitivity_figure(aggregate(records))
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 4 and len({(im.norm.vmin, im.norm.vmax) for im in images}) == 1
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "accuracy" in bars[0].get_ylabel()
    assert [t.get_text() for t in images[0].axes.get_yticklabels()] == ["1e-3", "1e-2"]


def test_the_shots_plot_says_what_its_error_bars_are():
    records = eleven(label="zeroshot", method="zeroshot", hp={}) + _lr_group() + _lr_group(shots=4)
    fig = shots_figure(aggregate(records))
    caption = fig._suptitle.get_text().replace("\n", " ")
    assert "population std over seeds (n = 10)" in caption and "mean over datasets" in caption
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    # The group's members are drawn as the group's one curve; the paper's lr average beside it.
    assert legend == ["zeroshot", "zeroshot: paper", "prolip λ=1/N, mean over lr", "prolip λ=1/N, mean over lr: paper"]


def test_report_files_label_random_weights_and_paper(tmp_path):
    records = eleven() + eleven(model="test-vit-tiny", weights="none", random=True)
    records += [
        rec(
            d,
            1,
            40.0 + lr * 100 + lam,
            protocol="sensitivity",
            shots=1,
            hp=prolip_hp(lr=lr, lam=lam),
            model="test-vit-tiny",
            weights="none",
            random=True,
        )
        for d in ("A", "B")
        for lr in (1e-3, 1e-2)
        for lam in (0.0, 1.0)
    ]
    records += [
        rec("A", s, 50.0, shots=k, model="test-vit-tiny", weights="none", random=True) for s in (1, 2) for k in (2, 4)
    ]
    paths = write_report(records, tmp_path / "rep")
    md = paths["markdown"].read_text()
    assert "(paper 64.28)" in md and len(re.findall(r"\(paper \d", md)) == 1
    assert "## fewshot — test-vit-tiny [RANDOM weights]" in md and "RANDOM weights: numbers from" in md
    assert "## fewshot — RN50 [openai]" in md
    assert "| lr \\ λ | 0 | 1 |" in md and "prolip λ=1 lr=1e-2" in md
    rows = list(csv.DictReader(open(paths["csv"])))
    assert {"mean", "std", "paper", "lr", "lam", "hm_seed_mean", "group", "notes"} <= set(rows[0])
    assert any(r["paper"] == "64.28" for r in rows)
    assert all(r["paper"] == "" for r in rows if r["random_weights"] == "True")
    assert json.loads(paths["json"].read_text())
    for key in ("plot_fewshot", "heatmap"):
        assert paths[key].stat().st_size > 5000 and paths[key].read_bytes()[:4] == b"\x89PNG"


def test_report_cli(tmp_path):
    from prolip.bench.records import append_record, cell_id

    for r in eleven():
        append_record(tmp_path / "records.jsonl", {**r, "cell": cell_id(r)})
    result = CliRunner().invoke(main, ["report", str(tmp_path / "records.jsonl"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "(paper 64.28)" in result.output and (tmp_path / "out" / "accuracy_vs_shots.png").is_file()
    result = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "no records found" in result.output
