"""`prolip eval RUN --data FOLDER --tta` and `prolip predict --tta` on a tiny random-weight run: the command's numbers
are test-time ProLIP's (prolip.tta.tta_logits from the run's adapted W), not the plain run's."""

import json

import pytest
import torch

from prolip import pipeline
from prolip.backbones import load_backbone
from prolip.features import encode_images
from prolip.functional import accuracy
from prolip.run import Run
from prolip.tta import tta_logits
from test_cli import TINY, invoke, make_folder


def test_eval_and_predict_with_tta(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=4)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    r = invoke(
        "fit",
        "--data",
        folder,
        "--shots",
        2,
        "--views",
        2,
        "--steps",
        10,
        "--lr",
        1e-3,
        "--cache-dir",
        cache,
        "--out",
        run_dir,
        *TINY,
    )
    assert r.exit_code == 0, r.output

    run = Run.load(run_dir)
    backbone = load_backbone("test-vit-tiny", "none")
    support = {p for p, _ in run.manifest["data"]["support"]}
    # eval leaves the run's own support images out
    paths = [p for p in sorted(folder.glob("*/*.jpg"), key=lambda p: (p.parent.name, p.name)) if str(p) not in support]
    labels = torch.tensor([run.classnames.index(p.parent.name) for p in paths])
    expected = tta_logits(
        backbone,
        run.method_state["W"],
        backbone.projection().bias,
        run.classifier,
        float(run.manifest["logit_scale"]),
        paths,
        views=4,
    )
    plain = pipeline.method_from_run(backbone, run).logits(encode_images(backbone, paths))
    assert (expected.softmax(-1) - plain.softmax(-1)).abs().max() > 1e-5  # so the checks below can tell them apart

    r = invoke("eval", run_dir, "--data", folder, "--cache-dir", cache, "--tta", "--tta-views", 4, "--json")
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert metrics["tta"] is True and metrics["eval_images"] == len(paths) == 12 - 3 * 2
    assert metrics["accuracy"] == accuracy(expected, labels)

    shown = [paths[0], paths[-1]]
    r = invoke("predict", run_dir, *shown, "--tta", "--tta-views", 4, "--json", "-k", 1)
    assert r.exit_code == 0, r.output
    top1 = [p["predictions"][0]["index"] for p in json.loads(r.stdout)]
    assert top1 == [int(expected[0].argmax()), int(expected[-1].argmax())]
    probs = [p["predictions"][0]["probability"] for p in json.loads(r.stdout)]
    assert probs == [round(float(expected[i].softmax(-1).max()), 6) for i in (0, -1)]


def test_tta_logits_rejects_bad_options_by_name():
    W, T = torch.zeros(4, 2), torch.eye(2)
    for bad in ({"views": 0}, {"ratio": 0.0}, {"ratio": 1.5}, {"steps": -1}, {"lr": -1.0}):
        ((name, value),) = bad.items()
        with pytest.raises(ValueError, match=f"{name}={value}"):
            tta_logits(None, W, None, T, 1.0, [], **bad)
