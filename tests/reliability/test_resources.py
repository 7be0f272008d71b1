"""Hostile files cost bounded time and memory: a FIFO, socket or device named like an image never hangs a reader,
the decoder, fit or predict (only regular files are opened), and an absurdly elongated image is cropped before it
is resized, so its transform takes megabytes, not gigabytes, while ordinary images keep bitwise the same pixels.
"""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from prolip.data import BadImageError, DataError, load_image, read_image_folder, read_image_list, read_templates
from prolip.data.benchmarks import load_benchmark, load_benchmark_folder
from prolip.data.folder import read_classnames

from .conftest import SPECIAL_KINDS, cli, deadline, fit_cli, make_folder, special_file

pytestmark = pytest.mark.reliability("resource")

LIMIT = 20  # seconds: anything that blocks on a FIFO blocks forever, so any bound shows it


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_the_decoder_refuses_a_file_that_is_not_regular_before_opening_it(tmp_path, kind, tally):
    path = special_file(tmp_path / "photo.jpg", kind)
    tally.input(f"{kind} named photo.jpg")
    with deadline(LIMIT), tally.raises(BadImageError, match=r"photo\.jpg: .*not a regular file"):
        load_image(path)


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_the_folder_reader_skips_and_lists_files_that_are_not_regular(tmp_path, kind, tally):
    root = make_folder(tmp_path / "data", per_class=2)
    special = special_file(root / "cat" / "zz.jpg", kind)
    with deadline(LIMIT):
        images = read_image_folder(root)
    assert special not in [it.path for it in images.items] and special in images.ignored_files
    assert len(images) == 6
    tally.input(f"{kind} with an image name in a class folder")
    tally.handled_ok("skipped and listed")


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_lists_and_split_files_refuse_images_that_are_not_regular(tmp_path, kind, tally):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"")
    special_file(tmp_path / "img" / "b.png", kind)
    (tmp_path / "l.csv").write_text("path,label\nimg/a.png,0\nimg/b.png,1\n")
    (tmp_path / "l.json").write_text(json.dumps([["img/a.png", 0], ["img/b.png", 1]]))
    # A link to a device resolves outside the dataset, which the readers refuse first.
    refused = "escapes the dataset root" if kind == "device" else "is a .*, not a regular file"
    for name in ("l.csv", "l.json"):
        with (
            deadline(LIMIT),
            tally.raises(
                DataError, match=rf"{name}, row 2: (image|path) .*b\.png.* {refused}", input=f"{name} naming a {kind}"
            ),
        ):
            read_image_list(tmp_path / name)
    ds = tmp_path / "dtd"
    (ds / "images" / "x").mkdir(parents=True)
    special_file(ds / "images" / "x" / "1.jpg", kind)
    (ds / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": [["x/1.jpg", 0, "banded"]]}))
    with (
        deadline(LIMIT),
        tally.raises(
            DataError, match=rf"train entry 0: (image|path) .*1\.jpg.* {refused}", input=f"split file naming a {kind}"
        ),
    ):
        load_benchmark_folder(ds)


def test_imagenet_style_folders_skip_and_list_files_that_are_not_regular(tmp_path, tally):
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    for wnid in ("n01", "n02"):
        make_folder(tmp_path / "imagenet-sketch" / "images", classes=(wnid,), per_class=2)
    fifo = special_file(tmp_path / "imagenet-sketch" / "images" / "n01" / "zz.jpg", "fifo")
    with deadline(LIMIT):
        test = load_benchmark("imagenet-sketch", tmp_path).test
    assert fifo not in [it.path for it in test.items] and fifo in test.ignored_files and len(test) == 4
    tally.input("FIFO in an ImageNet-Sketch class folder")
    tally.handled_ok("skipped and listed")


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_text_inputs_that_are_not_regular_files_are_refused(tmp_path, kind, tally):
    root = make_folder(tmp_path / "data", classes=("a", "b"), per_class=1)
    readers = {
        "templates.txt": lambda p: read_templates(p),
        "names.txt": lambda p: read_classnames(p, ["a", "b"]),
        "list.csv": lambda p: read_image_list(p),
        "names.json": lambda p: read_image_folder(root, p),
    }
    for name, read in readers.items():
        path = special_file(tmp_path / name, kind)
        with (
            deadline(LIMIT),
            tally.raises(DataError, match=rf"{name} is a .*, not a regular file", input=f"{kind} as {name}"),
        ):
            read(path)
    ds = tmp_path / "dtd"
    ds.mkdir()
    special_file(ds / "split_zhou_DescribableTextures.json", kind)
    with (
        deadline(LIMIT),
        tally.raises(
            DataError,
            match=r"split_zhou_DescribableTextures\.json is a .*, not a regular",
            input=f"{kind} as a split file",
        ),
    ):
        load_benchmark("dtd", tmp_path)


def test_fit_and_predict_never_hang_on_a_fifo(tmp_path, tally):
    data = make_folder(tmp_path / "data", per_class=3)
    fifo = special_file(data / "dog" / "zz_pipe.jpg", "fifo")
    with deadline(120):
        r = fit_cli(data, tmp_path / "run", tmp_path / "cache", shots=1, views=1, steps=2)
    assert r.exit_code == 0, r.output
    assert str(fifo) in json.loads((tmp_path / "run" / "manifest.json").read_text())["ignored_files"]
    tally.input("FIFO in the data of fit")
    tally.handled_ok("fit skipped and listed it")
    with deadline(120):
        r = cli("predict", tmp_path / "run", fifo)
    tally.cli_error(r, rf"{re.escape(str(fifo))}: a FIFO .*not a regular file", input="predict on a FIFO")


# ---- memory bounded by the output size ------------------------------------------------------------------------------

# Run in a child whose address space is capped a little above what it has mapped after the imports: a transform
# that tries to resize 40000x1 to 8,960,000x224 (8 GB) dies of MemoryError instead of taking the machine down.
PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from PIL import Image
    from prolip.backbones.base import Preprocessing
    from prolip.transforms import augment_transform, center_transform
    prep = Preprocessing(224, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    center, augment = center_transform(prep), augment_transform(prep)
    center(Image.new("RGB", (300, 200))); augment(Image.new("RGB", (300, 200)), 0)  # warm up the code paths
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 1536 * 2**20, resource.RLIM_INFINITY))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shapes = {}
    for w, h in json.loads(sys.argv[1]):
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
        shapes[f"{w}x{h}"] = [list(center(image).shape), list(augment(image, 7).shape)]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"shapes": shapes, "peak_growth_mb": (after - before) / 1024}))
""")


def test_extremely_elongated_images_transform_in_bounded_memory(tally):
    sizes = [[40000, 1], [1, 40000], [20000, 1], [1, 20000], [5000, 3]]
    child = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(sizes)], capture_output=True, text=True, timeout=300
    )
    tally.input(*(f"{w}x{h} image" for w, h in sizes))
    assert child.returncode == 0, child.stderr[-2000:]
    report = json.loads(child.stdout)
    assert all(shape == [[3, 224, 224]] * 2 for shape in report["shapes"].values()), report
    assert report["peak_growth_mb"] < 200, report
    tally.handled_ok(f"peak growth {report['peak_growth_mb']:.0f} MB")


@pytest.mark.reliability("determinism")
@pytest.mark.parametrize(
    "size", [(500, 375), (375, 500), (224, 224), (225, 224), (1000, 20), (20, 1000), (31, 7), (640, 480), (4000, 3000)]
)
def test_the_center_transform_is_bitwise_torchvisions_on_ordinary_images(size, tally):
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from prolip.backbones.base import Preprocessing
    from prolip.transforms import center_transform

    prep = Preprocessing(224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    reference = T.Compose(
        [
            T.Resize(224, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(prep.mean, prep.std),
        ]
    )
    w, h = size
    image = Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8))
    tally.input(f"{w}x{h} image")
    assert torch.equal(center_transform(prep)(image), reference(image))
    tally.handled_ok("bitwise equal")
