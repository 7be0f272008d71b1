"""Same seed, same numbers, bitwise on CPU: repeated runs, resumed vs uninterrupted extraction, 1 vs 2 processes.

(Resumed vs uninterrupted extraction is also checked after every kind of fault in test_faults.py.)
"""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import fit_cli, free_port, make_folder, make_images, unit_contents

pytestmark = pytest.mark.reliability("determinism")


def test_repeated_fits_in_fresh_caches_are_bitwise_equal(tmp_path, tally):
    import json

    data = make_folder(tmp_path / "data", per_class=4)
    outs = []
    for i in range(2):
        r = fit_cli(
            data,
            tmp_path / f"run{i}",
            tmp_path / f"cache{i}",
            "--lr",
            1e-3,
            "--seed",
            5,
            "--json",
            shots=2,
            views=3,
            steps=20,
        )
        assert r.exit_code == 0, r.output
        outs.append(json.loads(r.stdout))
    a, b = (load_file(str(tmp_path / f"run{i}" / "method.safetensors")) for i in range(2))
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert tally.lost(len(differing)) == 0, differing
    assert {k: v for k, v in outs[0].items() if "seconds" not in k} == {
        k: v for k, v in outs[1].items() if "seconds" not in k
    }
    assert unit_contents(tmp_path / "cache0") == unit_contents(tmp_path / "cache1")
    r = fit_cli(
        data, tmp_path / "run_other", tmp_path / "cache0", "--lr", 1e-3, "--seed", 6, shots=2, views=3, steps=20
    )
    assert r.exit_code == 0, r.output
    other = load_file(str(tmp_path / "run_other" / "method.safetensors"))
    assert not torch.equal(other["W"], a["W"])  # the comparison above can fail: another seed differs


def test_resumed_extraction_equals_uninterrupted(tmp_path, tiny_vit, tally):
    from prolip.features import FeatureCache

    paths = make_images(tmp_path / "img", n=10)

    def cache(root):
        return FeatureCache(root, tiny_vit, progress=False, unit_images=3, batch_size=4)

    full = cache(tmp_path / "full").views(paths, 4).to_tensor()
    # An extraction stopped after 2 units: resuming computes the other units exactly as a single run does.
    partial = cache(tmp_path / "resumed")
    import prolip.features.storage as storage_mod

    real = storage_mod.write_unit
    written = []

    def stop_after_two(*a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(1)
        return real(*a, **k)

    storage_mod.write_unit = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            partial.views(paths, 4)
    finally:
        storage_mod.write_unit = real
    tally.fault("interrupted after 2 units")
    resumed = cache(tmp_path / "resumed")
    again = resumed.views(paths, 4).to_tensor()
    assert resumed.stats.forward_passes == (10 - 6) * 4
    assert tally.lost(int(not torch.equal(again, full))) == 0
    assert unit_contents(tmp_path / "resumed") == unit_contents(tmp_path / "full")


DIST = """
import sys, torch, torch.distributed as dist
from pathlib import Path
from prolip.backbones import load_backbone
from prolip.features import extract_dataset
dist.init_process_group('gloo')
paths = sorted(Path(sys.argv[1]).glob('*.png'))
stats = extract_dataset(load_backbone('test-vit-tiny', 'none'), paths, num_views=2, cache_dir=sys.argv[2],
                        batch_size=4)
Path(sys.argv[2] + f'.rank{dist.get_rank()}').write_text(str(stats.forward_passes))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_two_processes_make_the_same_cache_as_one(tmp_path, tally):
    from prolip.backbones import load_backbone
    from prolip.features import extract_dataset

    paths = make_images(tmp_path / "img", n=80)  # 3 units of 32 images: ranks split them
    extract_dataset(
        load_backbone("test-vit-tiny", "none"), paths, num_views=2, cache_dir=tmp_path / "one", batch_size=4
    )
    script = tmp_path / "dist.py"
    script.write_text(DIST)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(script),
            str(tmp_path / "img"),
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    per_rank = sorted(int((tmp_path / f"two.rank{r}").read_text()) for r in range(2))
    assert len(per_rank) == 2 and all(n > 0 for n in per_rank) and sum(per_rank) == 80 * 2
    one, two = unit_contents(tmp_path / "one"), unit_contents(tmp_path / "two")
    assert tally.lost(len(set(one) ^ set(two)) + sum(one[k] != two[k] for k in set(one) & set(two))) == 0
